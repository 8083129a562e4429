"""`rayrlhf bench`: throughput of the configured run, and of sweeps around it, per stage.

Each point is a short real run (the same `train` as always); its first `bench.warmup_steps`
iterations are left out. For each point: seconds per stage (generate; experience = rewards,
reference, old log-probs, values; train; weight sync; other = what no stage accounts for),
samples/s and tokens/s for the step and each stage, and the training stage's model FLOPs
utilisation when `bench.peak_tflops` is known. Beside it, in the same run: TRL's GRPOTrainer on the
configured point, just before and just after ours (benchmarks/trl_grpo.py, a separate process;
its rate is the mean of the two), and the weight sync against a plain memory copy of the same
bytes. Writes bench.json, bench.csv and bench.png to output_dir.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rayrlhf.config import validate
from rayrlhf.driver import prepare_models, train
from rayrlhf.tasks import TASKS

STAGES = ("generate", "experience", "train", "weight_sync")
TRL_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "trl_grpo.py"


def run_bench(cfg: DictConfig) -> dict:
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
    # TRL runs just before and just after the base point, and the memory copy right after it: a
    # shared VM's speed drifts by tens of percent within minutes, and bracketing cancels a steady
    # drift. Without a cluster to connect to, each point starts its own local one, so that none
    # is running beside TRL.
    trl_runs = [trl_baseline(cfg, out, "before")] if cfg.bench.trl else []
    base = measure("base", configs.pop("base"), params)
    sync = sync_vs_memcpy(base)
    if trl_runs and trl_runs[0]["trl/samples_per_s"] is not None:
        trl_runs.append(trl_baseline(cfg, out, "after"))
    baseline = mean_trl(trl_runs)
    results = [base] + [measure(name, point_cfg, params) for name, point_cfg in configs.items()]
    report = {"model/path": cfg.model.path, "model/parameters": params, "points": results,
              "ours/samples_per_s": base["samples_per_s"],
              "unattributed_frac": base["seconds/other"] / base["seconds/step"],
              "weight_sync": sync, "growth": growth(results), **baseline}
    trl = report["trl/samples_per_s"]
    report["ratio_vs_trl"] = base["samples_per_s"] / trl if trl else None
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


def measure(name: str, cfg: DictConfig, params: int) -> dict:
    """Means over the iterations after warm-up."""
    rows = train(cfg)[cfg.bench.warmup_steps:]

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    samples = cfg.trainer.prompts_per_step * cfg.rollout.n
    tokens = mean("response/length_mean") * samples
    result = {"point": name, "prompts_per_step": cfg.trainer.prompts_per_step, "n": cfg.rollout.n,
              "max_new_tokens": cfg.rollout.max_new_tokens, "samples_per_step": samples,
              "response_tokens_per_step": tokens, "seconds/step": mean("time/step")}
    for stage in STAGES:
        seconds = mean(f"time/{stage}")
        result |= {f"seconds/{stage}": seconds, f"samples_per_s/{stage}": samples / seconds,
                   f"tokens_per_s/{stage}": tokens / seconds}
    result["seconds/other"] = result["seconds/step"] - sum(result[f"seconds/{s}"] for s in STAGES)
    result["samples_per_s"] = samples / result["seconds/step"]
    result["tokens_per_s"] = tokens / result["seconds/step"]
    result["sync/bytes"] = mean("sync/bytes")
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


def trl_baseline(cfg: DictConfig, out: Path, when: str) -> dict:
    """TRL's GRPOTrainer on the configured point, in its own process with every core."""
    prompts = out / "trl_prompts.jsonl"
    texts = TASKS[cfg.data.task].prompts(max(256, cfg.trainer.prompts_per_step * 4), cfg.seed, False)
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    result = out / f"trl_{when}.json"
    command = [sys.executable, str(TRL_SCRIPT), "--model", cfg.model.path, "--prompts", str(prompts),
               "--num-generations", str(cfg.rollout.n), "--max-new-tokens", str(cfg.rollout.max_new_tokens),
               "--prompts-per-step", str(cfg.trainer.prompts_per_step),
               "--steps", str(cfg.bench.warmup_steps + cfg.bench.steps),
               "--warmup-steps", str(cfg.bench.warmup_steps), "--lr", str(cfg.actor.lr),
               "--seed", str(cfg.seed),
               "--threads", str(os.cpu_count()), "--output", str(result),
               "--temperature", str(cfg.rollout.temperature)]
    env = {**os.environ, "PYTHONPATH": str(TRL_SCRIPT.parent.parent)}
    print(f"== trl: GRPOTrainer on the base point, {when} it", flush=True)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"warning: the TRL baseline did not run: {reason}", flush=True)
        return {"trl/samples_per_s": None, "trl/error": reason}
    trl = json.loads(result.read_text())
    return {"trl/samples_per_s": trl["samples_per_s"], "trl/version": trl["trl_version"]}


def mean_trl(runs: list[dict]) -> dict:
    """TRL's rate as the mean of its runs around the base point (each also reported), or why
    there is none."""
    rates = [run["trl/samples_per_s"] for run in runs]
    if not runs or None in rates:
        return runs[-1] if runs else {"trl/samples_per_s": None}
    return {"trl/samples_per_s": sum(rates) / len(rates), "trl/samples_per_s_runs": rates,
            "trl/version": runs[0]["trl/version"]}


def write_csv(results: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
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
