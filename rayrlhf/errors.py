"""Errors that end a run with one clear message (the CLI prints them and exits non-zero)."""


class RayRLHFError(Exception):
    """Base for problems in the user's input or setup, as opposed to bugs."""


class DataError(RayRLHFError):
    pass


class ModelError(RayRLHFError):
    pass


class RewardError(RayRLHFError):
    pass


class EnvironmentFailure(RayRLHFError):
    """A rollout environment (rollout.env) that cannot be loaded, raised or timed out."""


class Interrupted(RayRLHFError):
    """SIGINT/SIGTERM: the run saved a checkpoint and stopped; exit code 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
