"""Where checkpoints live, which is the newest, and the driver's own part of them.

A checkpoint is a directory `output_dir/checkpoints/step_NNNNNN` with the trainers' DeepSpeed
states (actor/, critic/) and the driver's `state.json`, written last: a checkpoint without it
was interrupted while being written and is ignored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rayrlhf.errors import RayRLHFError

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


def write_state(path: Path, state: dict) -> None:
    tmp = path / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.rename(path / STATE_FILE)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def prune(output_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
