"""Stage timing, metrics.jsonl, TensorBoard/W&B and the progress bar: kept out of the driver loop's way."""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import time
from pathlib import Path

from tqdm import tqdm

from rayrlhf.errors import RayRLHFError

STAGES = ("generate", "experience", "train", "weight_sync", "eval")


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - begin

    def metrics(self) -> dict[str, float]:
        out = {f"time/{stage}": self.seconds.get(stage, 0.0) for stage in STAGES}
        out["time/step"] = time.perf_counter() - self.start
        return out


PPO_PROGRESS = {"reward": "reward/mean", "kl": "kl/mean", "len": "response/length_mean",
                "tok_s": "throughput/tokens_per_s"}


def process_memory() -> dict[str, float]:
    """This process's memory in GiB, with that of the processes it started (a tensor-parallel
    engine's workers), so each actor can report its own role's footprint."""
    import resource

    import psutil
    import torch

    children = psutil.Process().children(recursive=True)
    out = {"rss_gib": sum(_rss(process) for process in [psutil.Process(), *children]) / 2**30,
           "rss_peak_gib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
                            + sum(_rss(process, peak=True) for process in children)) / 2**30}
    if torch.cuda.is_available():
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _rss(process, peak: bool = False) -> int:
    """A process's resident bytes, or its peak (VmHWM); 0 for one that has exited."""
    import psutil

    try:
        if not peak:
            return process.memory_info().rss
        with open(f"/proc/{process.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (psutil.Error, OSError, StopIteration):
        return 0


class MetricsLog:
    """Each record goes to metrics.jsonl, optionally TensorBoard and W&B; key numbers go to a progress bar."""

    def __init__(self, output_dir: Path, total_steps: int, first_step: int = 1, *, name: str = "ppo",
                 progress: dict[str, str] | None = None, logging_cfg=None, config: dict | None = None):
        output_dir = Path(output_dir)
        self.progress = PPO_PROGRESS if progress is None else progress
        # Writers that can fail on setup come first, so a failure leaves no file open.
        self.writer = self.run = None
        if logging_cfg is not None and logging_cfg.wandb:
            self.run = _wandb_run(output_dir, logging_cfg, config)
        if logging_cfg is not None and logging_cfg.tensorboard:
            self.writer = _summary_writer(output_dir / "tensorboard", first_step)
        self.file = _records_file(output_dir / "metrics.jsonl", first_step)
        self.output_dir, self.first_step, self.samples_file = output_dir, first_step, None
        self.bar = tqdm(total=total_steps, initial=first_step - 1, desc=name, unit="step",
                        dynamic_ncols=True)

    def log(self, metrics: dict[str, float], advance: bool = True) -> None:
        self.file.write(json.dumps(metrics) + "\n")  # NaN/inf become NaN/Infinity, which json.loads reads
        self.file.flush()
        step = metrics["step"]
        scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, numbers.Real)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, global_step=step)
            self.writer.flush()
        if self.run is not None:
            self.run.log(scalars, step=step)
        shown = {label: f"{metrics[key]:{'.0f' if 'per_s' in key else '.3f'}}"
                 for label, key in self.progress.items() if key in metrics}
        if shown:
            self.bar.set_postfix(shown, refresh=False)
        if advance:
            self.bar.update(1)
        else:
            self.bar.refresh()

    def samples(self, records: list[dict]) -> None:
        """Sample records (each with its "step") to samples.jsonl, kept over a resume as metrics are."""
        if self.samples_file is None:
            self.samples_file = _records_file(self.output_dir / "samples.jsonl", self.first_step)
        self.samples_file.writelines(json.dumps(r) + "\n" for r in records)
        self.samples_file.flush()

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.samples_file is not None:
            self.samples_file.close()
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def _records_file(path: Path, first_step: int):
    """A JSONL file of records by step, open for writing: a fresh run starts it anew, a resumed one
    keeps the steps before it."""
    kept = []
    if first_step > 1 and path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] < first_step]
    file = path.open("w", encoding="utf-8")
    file.writelines(line + "\n" for line in kept)
    return file


def _summary_writer(log_dir: Path, first_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RayRLHFError("logging.tensorboard needs tensorboard: pip install tensorboard") from e
    # On resume, purge_step makes TensorBoard drop the old run's events from first_step on.
    return SummaryWriter(str(log_dir), purge_step=first_step if first_step > 1 else None)


def _wandb_run(output_dir: Path, logging_cfg, config: dict | None):
    try:
        import wandb
    except ImportError as e:
        raise RayRLHFError("logging.wandb needs wandb: pip install wandb") from e
    os.environ.setdefault("WANDB_SILENT", "true")  # keep its banner off the progress bar
    return wandb.init(project=logging_cfg.wandb_project, mode=logging_cfg.wandb_mode, dir=str(output_dir),
                      config=config, name=output_dir.name, reinit="finish_previous")
