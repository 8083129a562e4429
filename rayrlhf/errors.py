"""Errors that end a run with one clear message (the CLI prints them and exits non-zero)."""


class RayRLHFError(Exception):
    """Base for problems in the user's input or setup, as opposed to bugs."""


class DataError(RayRLHFError):
    pass


class ModelError(RayRLHFError):
    pass


class RewardError(RayRLHFError):
    pass
