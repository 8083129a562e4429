"""`rayrlhf bench`: throughput of the configured run, and of sweeps around it, per stage.

Each point is a short real run (the same `train` as always); its first `bench.warmup_steps`
iterations are left out. For each point: seconds per stage (generate; experience = rewards,
reference, old log-probs, values; train; weight sync; other = what no stage accounts for),
samples/s and tokens/s for the step and each stage, and the training stage's model FLOPs
utilisation when `bench.peak_tflops` is known. Beside it, in the same run: TRL's GRPOTrainer on the
configured point, in a process of its own that takes one step after each of ours (see `PacedTRL`),
and the weight sync against a plain memory copy of the same bytes. Writes bench.json, bench.csv
and bench.png to output_dir.
"""

from __future__ import annotations

import csv
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rayrlhf.config import ConfigError, validate
from rayrlhf.driver import prepare_models, train
from rayrlhf.tasks import TASKS

STAGES = ("generate", "experience", "train", "weight_sync")
TRL_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "trl_grpo.py"
# How long the bench waits for TRL's next word (its start-up, a step, its exit) before giving up.
TRL_SILENCE_S = 600


def run_bench(cfg: DictConfig) -> dict:
    if cfg.bench.trl and cfg.trainer.async_rollout:
        raise ConfigError("bench.trl: TRL takes its steps between ours, where asynchronous rollouts would "
                          "be generating beside it; set bench.trl=false with trainer.async_rollout=true")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = {"base": []}
    points |= {f"prompts={p}": [f"trainer.prompts_per_step={p}",
                                f"algorithm.train_batch_size={p * cfg.rollout.n}"]
               for p in cfg.bench.sweep_prompts}
    points |= {f"max_new_tokens={t}": [f"rollout.max_new_tokens={t}"] for t in cfg.bench.sweep_max_new_tokens}
    configs = {name: point_config(cfg, out / name, overrides) for name, overrides in points.items()}
    prepare_models(cfg)
    params = count_parameters(cfg.model.path)
    # TRL takes its steps in turn with the base point's, and the memory copy runs right after it:
    # a shared VM's speed drifts by tens of percent within minutes.
    trl = PacedTRL(cfg, out) if cfg.bench.trl else None
    try:
        base = measure("base", configs.pop("base"), params, after_step=trl.take_turn if trl else None)
    finally:
        baseline = trl.finish() if trl else {"trl/samples_per_s": None}
    sync = sync_vs_memcpy(base)
    results = [base] + [measure(name, point_cfg, params) for name, point_cfg in configs.items()]
    report = {"model/path": cfg.model.path, "model/parameters": params, "points": results,
              "ours/samples_per_s": base["samples_per_s"],
              "unattributed_frac": base["seconds/other"] / base["seconds/step"],
              "weight_sync": sync, "growth": growth(results), **baseline}
    report |= compare(base, baseline)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    write_csv(results, out / "bench.csv")
    plot(report, out / "bench.png")
    return report


def point_config(cfg: DictConfig, output_dir: Path, overrides: list[str]) -> DictConfig:
    point = OmegaConf.merge(cfg, OmegaConf.from_dotlist([
        f"output_dir={output_dir}", f"trainer.total_steps={cfg.bench.warmup_steps + cfg.bench.steps}",
        "eval.every=0", "trainer.checkpoint_every=0", "logging.tensorboard=false", *overrides]))
    validate(point, "ppo")
    return point


def count_parameters(path: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def measure(name: str, cfg: DictConfig, params: int,
            after_step: Callable[[dict], None] | None = None) -> dict:
    """Means over the iterations after warm-up, and each iteration's seconds."""
    rows = train(cfg, after_step)[cfg.bench.warmup_steps:]

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    samples = cfg.trainer.prompts_per_step * cfg.rollout.n
    tokens = mean("response/length_mean") * samples
    result = {"point": name, "prompts_per_step": cfg.trainer.prompts_per_step, "n": cfg.rollout.n,
              "max_new_tokens": cfg.rollout.max_new_tokens, "samples_per_step": samples,
              "response_tokens_per_step": tokens, "seconds/step": mean("time/step"),
              "seconds/each_step": [r["time/step"] for r in rows]}
    for stage in STAGES:
        seconds = mean(f"time/{stage}")
        result |= {f"seconds/{stage}": seconds, f"samples_per_s/{stage}": samples / seconds,
                   f"tokens_per_s/{stage}": tokens / seconds}
    result["seconds/other"] = result["seconds/step"] - sum(result[f"seconds/{s}"] for s in STAGES)
    result["samples_per_s"] = samples / result["seconds/step"]
    result["tokens_per_s"] = tokens / result["seconds/step"]
    result["sync/bytes"] = mean("sync/bytes")
    result |= {key: max(r[key] for r in rows) for key in rows[-1] if key.endswith("_rss_peak_gib")}
    # Forward and backward of the actor (and critic) over every token, each PPO epoch: 6 N flops.
    trained_models = 2 if cfg.algorithm.estimator == "gae" else 1
    flops = 6 * params * mean("batch/tokens") * cfg.algorithm.ppo_epochs * trained_models
    result["train/tflops_per_s"] = flops / result["seconds/train"] / 1e12
    devices = max(cfg.actor.num_ranks, 1) * trained_models
    peak = cfg.bench.peak_tflops
    result["train/mfu"] = result["train/tflops_per_s"] / (peak * devices) if peak else None
    return result


def sync_vs_memcpy(point: dict) -> dict:
    """The sync's time against one in-memory copy of the same bytes on this machine."""
    nbytes = int(point["sync/bytes"])
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        begin = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - begin)
    return {"bytes": nbytes, "seconds": point["seconds/weight_sync"], "memcpy_seconds": best,
            "gb_per_s": nbytes / point["seconds/weight_sync"] / 1e9, "memcpy_gb_per_s": nbytes / best / 1e9,
            "times_memcpy": point["seconds/weight_sync"] / best}


def growth(results: list[dict]) -> dict[str, str]:
    """How the step time grows with the work in each sweep, in words (log-log slope)."""
    words = {}
    sweeps = (("prompts_per_step", "samples_per_step"), ("max_new_tokens", "response_tokens_per_step"))
    for sweep, work in sweeps:
        others = [k for k in ("prompts_per_step", "max_new_tokens") if k != sweep]
        base = results[0]
        line = sorted((r for r in results if all(r[k] == base[k] for k in others)), key=lambda r: r[work])
        if len(line) < 2 or line[-1][work] <= line[0][work]:
            continue
        slope = math.log(line[-1]["seconds/step"] / line[0]["seconds/step"]) / \
            math.log(line[-1][work] / line[0][work])
        kind = "sublinear (fixed costs dominate)" if slope < 0.85 else \
            "about linear" if slope <= 1.15 else "worse than linear"
        ratio = line[-1][work] / line[0][work]
        words[sweep] = (f"step time grows {kind} with {work.replace('_', ' ')}: x{ratio:.1f} work -> "
                        f"x{line[-1]['seconds/step'] / line[0]['seconds/step']:.2f} time "
                        f"(log-log slope {slope:.2f})")
    return words


class PacedTRL:
    """TRL's GRPOTrainer on the configured point (benchmarks/trl_grpo.py --paced), in a process of
    its own that takes one step after each of ours and waits while ours run: both are measured
    over the same minutes, step by step, on a machine whose speed drifts by tens of percent
    within minutes. It starts beside our set-up; its output goes to trl.log in output_dir."""

    def __init__(self, cfg: DictConfig, out: Path):
        prompts = out / "trl_prompts.jsonl"
        texts = TASKS[cfg.data.task].prompts(max(256, cfg.trainer.prompts_per_step * 4), cfg.seed, False)
        prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        self.result_path, self.log_path = out / "trl.json", out / "trl.log"
        self.result_path.unlink(missing_ok=True)
        command = [sys.executable, str(TRL_SCRIPT), "--paced", "--model", cfg.model.path,
                   "--prompts", str(prompts), "--num-generations", str(cfg.rollout.n),
                   "--max-new-tokens", str(cfg.rollout.max_new_tokens),
                   "--prompts-per-step", str(cfg.trainer.prompts_per_step),
                   "--steps", str(cfg.bench.warmup_steps + cfg.bench.steps),
                   "--warmup-steps", str(cfg.bench.warmup_steps), "--lr", str(cfg.actor.lr),
                   "--seed", str(cfg.seed), "--threads", str(os.cpu_count()),
                   "--output", str(self.result_path), "--temperature", str(cfg.rollout.temperature)]
        env = {**os.environ, "PYTHONPATH": str(TRL_SCRIPT.parent.parent)}
        print("== trl: GRPOTrainer on the base point, a step after each of ours", flush=True)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True)
        self.ready = False
        self.error: str | None = None
        self.said: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("rayrlhf-pace "):
                self.said.put(line.split()[1])
        self.said.put(None)  # its output ended

    def _expect(self, word: str) -> bool:
        """Waits for TRL's next "rayrlhf-pace" line, which must say `word`."""
        try:
            said = self.said.get(timeout=TRL_SILENCE_S)
        except queue.Empty:
            return self._failed(f"no word from it in {TRL_SILENCE_S} s")
        return said == word or self._failed()

    def _failed(self, reason: str | None = None) -> bool:
        """Stops TRL and keeps why: `reason`, else the last line of its log."""
        self.proc.kill()
        self.proc.wait()
        lines = self.log_path.read_text().strip().splitlines()
        self.error = reason or (lines[-1] if lines else f"it exited with status {self.proc.returncode}")
        print(f"warning: the TRL baseline stopped: {self.error}", flush=True)
        return False

    def take_turn(self, _metrics: dict) -> None:
        """TRL's next step, run now that ours is over (no-op once TRL has failed)."""
        if self.error is None and not self.ready:
            self.ready = self._expect("ready")
        if self.error is not None:
            return
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._failed()
            return
        self._expect("done")

    def finish(self) -> dict:
        """TRL's rate over its steps after warm-up, with each step's seconds, or why there is none."""
        if self.error is None:
            self.proc.stdin.close()
            try:
                if self.proc.wait(timeout=TRL_SILENCE_S) != 0 or not self.result_path.is_file():
                    self._failed()
            except subprocess.TimeoutExpired:
                self._failed(f"it did not exit within {TRL_SILENCE_S} s of its last step")
        if self.error is not None:
            return {"trl/samples_per_s": None, "trl/error": self.error}
        trl = json.loads(self.result_path.read_text())
        return {"trl/samples_per_s": trl["samples_per_s"], "trl/seconds/each_step": trl["step_seconds"],
                "trl/rss_peak_gib": trl["rss_peak_gib"], "trl/version": trl["trl_version"]}


def compare(base: dict, trl: dict) -> dict:
    """Ours against TRL: the ratio of the rates, and step by step (TRL's seconds over ours, for
    the steps taken in turn), which shows how much of the ratio the machine's drift moves."""
    if not trl["trl/samples_per_s"]:
        return {"ratio_vs_trl": None}
    per_step = [theirs / ours for ours, theirs in zip(base["seconds/each_step"], trl["trl/seconds/each_step"],
                                                      strict=True)]
    return {"ratio_vs_trl": base["samples_per_s"] / trl["trl/samples_per_s"],
            "ratio_vs_trl/each_step": per_step, "ratio_vs_trl/median_step": statistics.median(per_step)}


def write_csv(results: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        # One row per point: its figures, not its per-iteration lists.
        fields = [key for key, value in results[0].items() if not isinstance(value, list)]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    fig, (stages_ax, rate_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    left = [0.0] * len(points)
    names = [p["point"] for p in points]
    for stage in (*STAGES, "other"):
        widths = [p[f"seconds/{stage}"] for p in points]
        stages_ax.barh(names, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    stages_ax.set_xlabel("seconds per iteration")
    stages_ax.legend(fontsize=8)
    labels = ["ours: " + n for n in names]
    rates = [p["samples_per_s"] for p in points]
    if report.get("trl/samples_per_s"):
        labels.append("TRL GRPOTrainer: base")
        rates.append(report["trl/samples_per_s"])
    rate_ax.barh(labels, rates, color="tab:green")
    rate_ax.set_xlabel("samples per second")
    fig.text(0.01, 0.01, "\n".join(report["growth"].values()), fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.08 * max(1, len(report["growth"])), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
