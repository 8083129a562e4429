"""SFT -> reward model -> PPO on the real Ray + DeepSpeed + vLLM actors (with PEFT methods: test_peft.py)."""

import json
from pathlib import Path

import pytest

from rayrlhf.config import load_config
from rayrlhf.pipeline import run_pipeline, stages_to_run

pytestmark = pytest.mark.integration


def short_pipeline(tmp_path, policy, *overrides):
    return load_config("conf/tiny_pipeline.yaml", [
        f"model.path={policy}", "model.build_tiny=false", f"output_dir={tmp_path / 'run'}",
        "sft.max_steps=40", "sft.eval_every=20", "rm.epochs=1", "rm.max_steps=48", "rm.eval_every=24",
        "trainer.total_steps=3", "trainer.prompts_per_step=32", "algorithm.train_batch_size=32",
        "actor.micro_batch_size=16", "critic.micro_batch_size=16", "eval.every=3", "eval.size=32",
        *overrides], stage=None)


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_pipeline_runs_every_stage_then_skips_finished_ones(tmp_path, ray_cluster, tiny_policy, capsys):
    cfg = short_pipeline(tmp_path, tiny_policy)
    summary = run_pipeline(cfg)
    out = Path(cfg.output_dir)
    for key in ("rm/accuracy", "sft/accuracy", "ppo/accuracy"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "curves.png").stat().st_size > 10_000

    # SFT learnt (held-out loss fell); the RM beats chance on held-out pairs.
    sft_evals = [r["eval/loss"] for r in rows(out / "sft" / "metrics.jsonl") if "eval/loss" in r]
    assert len(sft_evals) == 2 and sft_evals[-1] < sft_evals[0] < 4.0
    assert summary["rm/accuracy"] > 0.7, summary
    # PPO started from the SFT policy, with the RM as its reward and the critic's start.
    ppo_cfg = load_config(out / "ppo" / "config.yaml", stage="ppo")
    assert ppo_cfg.model.path == str(out / "sft" / "model")
    assert [m.path for m in ppo_cfg.reward.models] == [str(out / "rm" / "model")]
    assert ppo_cfg.critic.model_path == str(out / "rm" / "model")
    ppo_rows = rows(out / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in ppo_rows] == [0, 1, 2, 3] and "reward/mean" not in ppo_rows[0]

    # A second run finds every stage done and skips them all.
    stamps = {s: (out / s / "metrics.jsonl").stat().st_mtime_ns for s in ("sft", "rm", "ppo")}
    capsys.readouterr()
    assert run_pipeline(cfg) == summary
    assert {s: (out / s / "metrics.jsonl").stat().st_mtime_ns for s in stamps} == stamps
    assert capsys.readouterr().out.count("skipped") == 3


def test_a_rerun_carries_on_to_the_later_stages():
    stages = ["sft", "rm", "ppo"]
    assert stages_to_run(stages, set(stages), []) == []
    assert stages_to_run(stages, set(stages), ["rm"]) == ["rm", "ppo"]
    assert stages_to_run(stages, {"sft", "ppo"}, []) == ["rm", "ppo"]  # rm was deleted
    assert stages_to_run(stages, set(), []) == stages

