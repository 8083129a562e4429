"""Checkpoint bookkeeping, and resuming a real run."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayrlhf.checkpoint import checkpoint_dir, complete_checkpoints, prune, resolve_resume, write_state
from rayrlhf.config import load_config
from rayrlhf.data import Prompt, PromptSampler
from rayrlhf.driver import train
from rayrlhf.errors import RayRLHFError


def make_checkpoints(root: Path, steps, complete=True):
    for step in steps:
        path = checkpoint_dir(root, step)
        path.mkdir(parents=True)
        if complete:
            write_state(path, {"step": step})


def test_latest_complete_checkpoint_and_pruning(tmp_path):
    make_checkpoints(tmp_path, [2, 4, 6])
    make_checkpoints(tmp_path, [8], complete=False)  # interrupted while being written
    assert resolve_resume("true", tmp_path) == checkpoint_dir(tmp_path, 6)
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume(str(checkpoint_dir(tmp_path, 2)), tmp_path) == checkpoint_dir(tmp_path, 2)
    prune(tmp_path, keep=2)
    assert complete_checkpoints(tmp_path) == [checkpoint_dir(tmp_path, 4), checkpoint_dir(tmp_path, 6)]


def test_resume_errors_name_the_problem(tmp_path):
    with pytest.raises(RayRLHFError, match="no complete checkpoint under"):
        resolve_resume("true", tmp_path)
    with pytest.raises(RayRLHFError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)


def test_sampler_state_round_trip():
    prompts = [Prompt(str(i), [i]) for i in range(7)]
    a = PromptSampler(prompts, 3, seed=1)
    a.next_batch()
    state = json.loads(json.dumps(a.state()))
    b = PromptSampler(prompts, 3, seed=99)
    b.restore(state)
    assert [[p.text for p in a.next_batch()] for _ in range(4)] == [[p.text for p in b.next_batch()]
                                                                    for _ in range(4)]


def tiny_run_args(tmp_path, policy, out):
    return [f"model.path={policy}", "model.build_tiny=false", f"output_dir={out}",
            "trainer.prompts_per_step=16", "algorithm.train_batch_size=16", "actor.micro_batch_size=16",
            "critic.micro_batch_size=16", "trainer.checkpoint_every=2"]


class Crash(Exception):
    """Ends a run between a checkpoint and the next one, as a lost node would."""


@pytest.mark.integration
def test_resumed_run_matches_the_uninterrupted_one(tmp_path, ray_cluster, tiny_policy):
    """Asynchronous rollouts (two batches in flight at the checkpoint: they are kept in it), LoRA
    dropout (the ranks' RNG states are kept) and a cosine schedule with warm-up (kept by DeepSpeed):
    the resumed steps are the uninterrupted run's."""
    extra = ["trainer.total_steps=4", "trainer.async_rollout=true", "trainer.max_staleness=2",
             "algorithm.tis_cap=2.0", "actor.peft.method=lora", "actor.peft.rank=4",
             "actor.peft.dropout=0.1", "actor.lr=1e-2",
             "actor.lr_schedule=cosine", "actor.warmup_steps=1", "critic.lr_schedule=linear"]

    def run(out, *more, after_step=None):
        args = tiny_run_args(tmp_path, tiny_policy, out) + extra + list(more)
        return train(load_config("conf/tiny_ppo.yaml", args), after_step)

    whole = run(tmp_path / "whole")

    def crash_after_the_checkpoint(metrics):
        if metrics["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        run(tmp_path / "split", after_step=crash_after_the_checkpoint)
    with pytest.raises(RayRLHFError, match=r"actor.num_ranks: 1 there, 2 now.*actor.peft: .* now"):
        run(tmp_path / "split", "resume=true", "actor.num_ranks=2", "actor.micro_batch_size=8",
            "actor.peft.method=lora", "actor.peft.rank=8")
    rest = run(tmp_path / "split", "resume=true")
    assert [m["step"] for m in rest] == [3, 4]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert [m["rollout/staleness"] for m in whole] == [0, 1, 2, 2]
    for resumed, uninterrupted in zip(rest, whole[2:], strict=True):
        for key in ("reward/mean", "kl/mean", "loss/policy", "loss/value", "response/length_mean",
                    "lr/actor", "lr/critic", "rollout/staleness"):
            assert math.isclose(resumed[key], uninterrupted[key], rel_tol=1e-4, abs_tol=1e-6), key
    # keep_checkpoints=2: steps 2 and 4 remain
    assert [p.name for p in complete_checkpoints(tmp_path / "split")] == ["step_000002", "step_000004"]


@pytest.mark.integration
def test_an_sft_stage_resumes_where_it_stopped(tmp_path, ray_cluster, tiny_policy):
    """LoRA dropout draws from each rank's RNG; the data order, the optimizer and the warm-up
    (which spans the stop) continue: the resumed steps are the uninterrupted run's."""
    from rayrlhf.supervised import train_supervised

    def run(out, *more):
        return train_supervised("sft", load_config("conf/tiny_pipeline.yaml", [
            f"model.path={tiny_policy}", "model.build_tiny=false", f"output_dir={out}", "sft.max_steps=4",
            "sft.checkpoint_every=2", "sft.peft.method=lora", "sft.peft.rank=4", "sft.peft.dropout=0.2",
            "sft.warmup_steps=3",
            "sft.eval_every=0", *more], stage="sft"))

    whole = run(tmp_path / "whole")
    run(tmp_path / "split", "sft.max_steps=2")  # stops at 2 of 4 (max_steps is not a resume key)
    resumed = run(tmp_path / "split", "resume=true")
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("whole", "split")]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    for got, expected in zip(rows[1][2:], rows[0][2:], strict=True):
        for key in ("loss/sft", "lr/sft"):
            assert math.isclose(got[key], expected[key], rel_tol=1e-4), key
    assert math.isclose(resumed["eval/loss"], whole["eval/loss"], rel_tol=1e-4)


@pytest.mark.integration
def test_sigterm_checkpoints_and_exits_with_a_resume_hint(tmp_path, tiny_policy):
    out = tmp_path / "run"
    args = tiny_run_args(tmp_path, tiny_policy, out) + ["trainer.total_steps=200",
                                                        "trainer.checkpoint_every=0"]
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:  # a file, not a pipe: the progress bar must never block the run
        proc = subprocess.Popen(
            [sys.executable, "-m", "rayrlhf.cli", "train", "--config", "conf/tiny_ppo.yaml", *args],
            stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    err = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "to continue, run the same command with resume=true" in err
    saved = complete_checkpoints(out)
    assert len(saved) == 1
    steps_logged = len(metrics.read_text().splitlines())
    assert saved[0].name == f"step_{steps_logged:06d}" and steps_logged < 200
