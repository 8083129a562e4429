"""Stage timing, metrics.jsonl and the console progress bar: kept out of the driver loop's way."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from tqdm import tqdm

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


class MetricsLog:
    """One JSON object per iteration in metrics.jsonl, and a progress bar with the key numbers."""

    def __init__(self, output_dir: Path, total_steps: int, first_step: int = 1):
        # A fresh run starts the file anew; a resumed one keeps the steps before it.
        path = output_dir / "metrics.jsonl"
        kept = []
        if first_step > 1 and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] < first_step]
        self.file = path.open("w", encoding="utf-8")
        self.file.writelines(line + "\n" for line in kept)
        self.bar = tqdm(total=total_steps, initial=first_step - 1, desc="ppo", unit="step",
                        dynamic_ncols=True)

    def log(self, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        self.bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl/mean', 0):.3f}",
                             len=f"{metrics['response/length_mean']:.1f}",
                             tok_s=f"{metrics['throughput/tokens_per_s']:.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
