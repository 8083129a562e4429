"""The InstructGPT pipeline: SFT -> reward model -> PPO, one output directory for all of it; or
SFT -> DPO, where DPO takes the place of the reward model and PPO.

    <output_dir>/sft/model      the SFT policy      (starts from model.path)
    <output_dir>/rm/model       the reward model    (starts from the SFT policy)
    <output_dir>/ppo/policy     the PPO policy      (starts from the SFT policy, rewarded by the RM)
    <output_dir>/dpo/model      the DPO policy      (starts from the SFT policy, its reference too)
    <output_dir>/summary.json   rm/accuracy, sft/accuracy, ppo/accuracy or dpo/accuracy, and more
    <output_dir>/curves.png     the stages' loss, accuracy and reward curves

A stage whose summary.json exists is skipped unless named in pipeline.rerun; once a stage runs,
the stages after it run too, since they read its checkpoint.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import ray
from omegaconf import DictConfig, OmegaConf

from rayrlhf.checkpoint import complete_checkpoints
from rayrlhf.cluster import start_ray
from rayrlhf.config import ConfigError, RewardModelSpec, validate
from rayrlhf.driver import train
from rayrlhf.supervised import train_supervised


def stage_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """Each stage's config, derived from the pipeline's and validated before anything runs."""
    root = Path(cfg.output_dir)
    stages = list(cfg.pipeline.stages)
    out = {}
    for stage in stages:
        stage_cfg = copy.deepcopy(cfg)
        stage_cfg.output_dir = str(root / stage)
        if stage in ("rm", "dpo") and "sft" in stages and not cfg[stage].model_path:
            stage_cfg[stage].model_path = str(root / "sft" / "model")
        if stage == "ppo":
            if "sft" in stages:
                stage_cfg.model.path, stage_cfg.model.build_tiny = str(root / "sft" / "model"), False
            if "rm" in stages:
                rm_path = str(root / "rm" / "model")
                stage_cfg.reward.models.append(RewardModelSpec(rm_path, cfg.pipeline.rm_weight))
                if cfg.pipeline.critic_from_rm and not cfg.critic.model_path:
                    stage_cfg.critic.model_path = rm_path
        if cfg.resume:  # each stage from its own newest checkpoint, where it has one
            if cfg.resume.lower() not in ("true", "latest"):
                raise ConfigError(f"resume={cfg.resume}: the pipeline resumes each stage from its newest "
                                  "checkpoint (resume=true); give a checkpoint path to the stage's own "
                                  "command")
            stage_cfg.resume = cfg.resume if complete_checkpoints(root / stage) else ""
        validate(stage_cfg, stage)
        out[stage] = stage_cfg
    return out


def run_pipeline(cfg: DictConfig) -> dict[str, float]:
    configs = stage_configs(cfg)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, root / "config.yaml", resolve=True)
    done = {stage for stage in configs if (root / stage / "summary.json").exists()}
    to_run = stages_to_run(list(configs), done, list(cfg.pipeline.rerun))
    started_ray = start_ray(cfg.ray)  # one cluster for every stage
    try:
        for stage, stage_cfg in configs.items():
            if stage not in to_run:
                print(f"== {stage}: done already ({root / stage}); skipped (pipeline.rerun=[{stage}] "
                      "runs it again)", flush=True)
                continue
            print(f"== {stage}: running, outputs in {stage_cfg.output_dir}", flush=True)
            if stage == "ppo":
                train(stage_cfg)
                write_ppo_summary(Path(stage_cfg.output_dir))
            else:
                train_supervised(stage, stage_cfg)
    finally:
        if started_ray:
            ray.shutdown()
    summary = pipeline_summary(root, list(configs))
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(root, list(configs), root / "curves.png")
    return summary


def stages_to_run(stages: list[str], done: set[str], rerun: list[str]) -> list[str]:
    """From the first stage that is not done or is to rerun, every stage (each reads the one
    before it)."""
    first = next((i for i, stage in enumerate(stages) if stage not in done or stage in rerun), len(stages))
    return stages[first:]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def write_ppo_summary(ppo_dir: Path) -> None:
    """Task accuracy (eval/rule_score) of the starting policy (step 0) and of the last
    evaluation, and the last training reward."""
    rows = read_metrics(ppo_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/rule_score" in r]
    train_rows = [r for r in rows if "reward/mean" in r]
    summary = {"steps": train_rows[-1]["step"] if train_rows else 0,
               "reward/mean_last": train_rows[-1]["reward/mean"] if train_rows else None}
    if evals:
        summary |= {"accuracy/start": evals[0]["eval/rule_score"] if evals[0]["step"] == 0 else None,
                    "accuracy/end": evals[-1]["eval/rule_score"]}
    (ppo_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def pipeline_summary(root: Path, stages: list[str]) -> dict:
    """The headline numbers: RM held-out pairwise accuracy, and the task accuracy of the SFT
    policy (the starting policy's evaluation in PPO or DPO) and of the PPO or DPO policy."""
    def stage_summary(stage: str) -> dict:
        path = root / stage / "summary.json"
        return json.loads(path.read_text()) if stage in stages and path.exists() else {}

    sft, rm, ppo, dpo = (stage_summary(stage) for stage in ("sft", "rm", "ppo", "dpo"))
    summary = {"rm/accuracy": rm.get("rm/accuracy"),
               "sft/accuracy": ppo.get("accuracy/start", dpo.get("accuracy/start")),
               "ppo/accuracy": ppo.get("accuracy/end"), "dpo/accuracy": dpo.get("accuracy/end"),
               "dpo/preference_accuracy": dpo.get("eval/accuracy"), "sft/eval_loss": sft.get("eval/loss"),
               "ppo/reward_mean_last": ppo.get("reward/mean_last")}
    return {k: v for k, v in summary.items() if v is not None}


def plot_curves(root: Path, stages: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    series = {"sft": [("loss/sft", "train loss"), ("eval/loss", "held-out loss")],
              "rm": [("loss/rm", "train loss"), ("eval/accuracy", "held-out pairwise accuracy")],
              "dpo": [("loss/dpo", "train loss"), ("eval/accuracy", "held-out preference accuracy")],
              "ppo": [("reward/mean", "reward (RM score)"), ("eval/rule_score", "held-out task accuracy")]}
    for ax, stage in zip(axes[0], stages, strict=True):
        rows = read_metrics(root / stage / "metrics.jsonl")
        # The training curve on the left axis; the held-out one on the right, on its own scale,
        # unless both are the same quantity (the SFT losses).
        right = ax if stage == "sft" else ax.twinx()
        colors = ("tab:blue", "tab:orange")
        for axis, color, (key, label) in zip((ax, right), colors, series[stage], strict=True):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                axis.plot(*zip(*points, strict=True), color=color, marker="o" if len(points) < 30 else None,
                          label=label)
            axis.set_ylabel(label, color=color)
        if right is ax:
            ax.set_ylabel("loss per response token", color="black")
            ax.legend(fontsize=8)
        ax.set_title(stage.upper())
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
