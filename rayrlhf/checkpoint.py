"""Where checkpoints live, which is the newest, the driver's own part of them, and stopping on a
signal with one.

A checkpoint is a directory `output_dir/checkpoints/step_NNNNNN` with the trainers' DeepSpeed
states (actor/, critic/, or the SFT/RM stage's) and the driver's `state.json`, written last: a
checkpoint without it was interrupted while being written and is ignored. The state records the
settings that decide what the checkpoint means (`resume_keys`); a run that changes them cannot
resume from it.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from rayrlhf.errors import RayRLHFError

# What a PPO checkpoint means: the models and their layout over ranks, the estimator (which
# trainers exist), and the size of the batches it holds (asynchronous runs keep them).
PPO_RESUME_KEYS = ("model.path", "model.tokenizer", "model.dtype", "critic.model_path",
                   "algorithm.estimator", "actor.num_ranks", "actor.zero_stage", "actor.peft",
                   "critic.num_ranks", "critic.zero_stage", "critic.peft", "trainer.prompts_per_step",
                   "rollout.n")


def supervised_resume_keys(stage: str) -> tuple[str, ...]:
    """An SFT, RM or DPO checkpoint: its model, layout over ranks, and data order (path, batch,
    seed); for DPO also the loss (SimPO's checkpoints hold no reference log-probs)."""
    own = ("model_path", "num_ranks", "zero_stage", "peft", "batch_size", "data.path") + \
        (("loss",) if stage == "dpo" else ())
    return ("seed", "model.path", "model.dtype", *(f"{stage}.{key}" for key in own))


def resume_keys(cfg, keys: tuple[str, ...]) -> dict:
    return {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            for key in keys for value in [OmegaConf.select(cfg, key)]}


def check_resumable(path: Path, cfg, keys: tuple[str, ...]) -> dict:
    """The checkpoint's state, once it is known to mean the same as this run; else an error naming
    every setting that differs."""
    state = read_state(path)
    saved, now = state.get("resume_keys", {}), resume_keys(cfg, keys)
    changed = [f"{key}: {saved[key]!r} there, {now[key]!r} now" for key in keys
               if key in saved and saved[key] != now[key]]
    if changed:
        raise RayRLHFError(f"resume from {path}: this run's settings change what the checkpoint means "
                           f"({'; '.join(changed)}); resume with the settings that wrote it, or start "
                           "afresh in another output_dir")
    return state

STATE_FILE = "state.json"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:06d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint that `resume` names: none, the newest in output_dir, or a path."""
    if not resume:
        return None
    if resume.lower() in ("true", "latest"):
        found = complete_checkpoints(output_dir)
        if not found:
            raise RayRLHFError(f"resume={resume}: no complete checkpoint under {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise RayRLHFError(f"resume={resume}: not a complete checkpoint (no {STATE_FILE} in it)")
    return path


def write_state(path: Path, state: dict, cfg=None, keys: tuple[str, ...] = ()) -> None:
    """The driver's state, with `keys` of `cfg` (see check_resumable); written last, atomically."""
    state = {**state, "resume_keys": resume_keys(cfg, keys)} if keys else state
    tmp = path / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.rename(path / STATE_FILE)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def prune(output_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second
    signal interrupts at once."""

    def __init__(self):
        self.signum = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # only there can Python catch them
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"signal {signum}: saving a checkpoint and stopping after this step "
                   "(signal again to stop at once)")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def save_rng_states(path: str, rank: int, device) -> None:
    """A trainer rank's random number generators (dropout draws from them), beside its shards."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(rng, Path(path) / f"rng_rank{rank}.pt")


def load_rng_states(path: str, rank: int, device) -> None:
    rng = torch.load(Path(path) / f"rng_rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
