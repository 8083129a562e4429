"""DPO and its relatives as a stage on the real trainer actors (Ray, DeepSpeed), alone and after SFT."""

import json
import math
from pathlib import Path

import pytest
import torch

from rayrlhf.config import load_config
from rayrlhf.pipeline import run_pipeline
from rayrlhf.supervised import train_supervised

pytestmark = pytest.mark.integration


def dpo(tmp_path, policy, *overrides, out="run"):
    """DPO from `policy` on the built-in alphabet task's pairs (the right continuation chosen over a
    near miss), 32 pairs a step."""
    return train_supervised("dpo", load_config("conf/tiny_dpo.yaml", [
        f"model.path={policy}", "model.build_tiny=false", f"output_dir={tmp_path / out}", "eval.function=''",
        "dpo.max_steps=10", "dpo.eval_every=0", "dpo.lr=1e-3", "dpo.data.synthetic_size=512", *overrides],
        stage="dpo"))


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("variant, first_loss", [
    (("dpo.loss=sigmoid",), math.log(2)), (("dpo.loss=sigmoid", "dpo.label_smoothing=0.2"), math.log(2)),
    (("dpo.loss=ipo", "dpo.beta=0.5"), 1.0), (("dpo.loss=hinge",), 1.0),
    (("dpo.loss=simpo", "dpo.beta=2.0", "dpo.simpo_gamma=0.5"), None),
], ids=["dpo", "cdpo", "ipo", "hinge", "simpo"])
def test_each_loss_learns_to_prefer_the_held_out_chosen_responses(tmp_path, ray_cluster, tiny_policy, variant,
                                                                  first_loss, capsys):
    """At the first step the policy is the reference, so every margin is 0 and the loss is known:
    log 2 (DPO, cDPO), (1 / (2 beta))^2 = 1 (IPO at beta 0.5), 1 (hinge). Ten steps later the
    held-out chosen responses are preferred (accuracy 0 at the start: no margin is positive)."""
    summary = dpo(tmp_path, tiny_policy, *variant)
    steps = rows(tmp_path / "run" / "metrics.jsonl")
    if first_loss is not None:
        assert math.isclose(steps[0]["loss/dpo"], first_loss, abs_tol=1e-4), steps[0]
    assert steps[-1]["loss/dpo"] < steps[0]["loss/dpo"]
    assert summary["eval/accuracy"] > 0.7 and summary["eval/margin"] > 0, summary
    # Only the reference-based losses score the reference, once, before the first step.
    assert ("the reference's log-probs of" in capsys.readouterr().out) == (first_loss is not None)


def test_dpo_on_zero3_ranks_with_lora_resumes_where_it_stopped(tmp_path, ray_cluster, tiny_policy):
    """Two ZeRO-3 ranks, LoRA, each pair packed after one copy of its prompt, micro-batches of about
    256 tokens (two a rank: 16 pairs of about 30 tokens). The ranks score the reference before their
    first step (the first loss is log 2); a run stopped after step 2 takes those scores from its
    checkpoint when resumed (its weights are no longer the reference's), so steps 3 and 4 are the
    uninterrupted run's."""
    args = ("dpo.num_ranks=2", "dpo.zero_stage=3", "dpo.peft.method=lora", "dpo.peft.rank=4",
            "dpo.packing=true",
            "dpo.micro_batch_size=16", "dpo.micro_batch_tokens=256", "dpo.max_steps=4",
            "dpo.checkpoint_every=2")
    whole = dpo(tmp_path, tiny_policy, *args, out="whole")
    dpo(tmp_path, tiny_policy, *args, "dpo.max_steps=2", out="split")
    resumed = dpo(tmp_path, tiny_policy, *args, "resume=true", out="split")
    uninterrupted, split = (rows(tmp_path / out / "metrics.jsonl") for out in ("whole", "split"))
    assert math.isclose(uninterrupted[0]["loss/dpo"], math.log(2), abs_tol=1e-4)
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for got, expected in zip(split[2:], uninterrupted[2:], strict=True):
        for key in ("loss/dpo", "dpo/margin", "dpo/rewards_chosen"):
            assert math.isclose(got[key], expected[key], rel_tol=1e-4, abs_tol=1e-6), key
    assert math.isclose(resumed["eval/loss"], whole["eval/loss"], rel_tol=1e-4)


def test_sft_then_dpo_reports_the_task_accuracy_of_both_policies(tmp_path, ray_cluster, tiny_policy):
    """pipeline.stages=[sft, dpo]: DPO starts from the SFT policy (its reference too) and reports the
    held-out task accuracy (alphabet_exact, greedy, by an engine of its own) before and after."""
    cfg = load_config("conf/tiny_dpo.yaml", [
        f"model.path={tiny_policy}", "model.build_tiny=false", f"output_dir={tmp_path / 'run'}",
        "sft.max_steps=20", "dpo.max_steps=8", "dpo.eval_every=4", "dpo.data.synthetic_size=512",
        "eval.size=32"], stage=None)
    summary = run_pipeline(cfg)
    out = Path(cfg.output_dir)
    stage = json.loads((out / "dpo" / "summary.json").read_text())
    assert summary["sft/accuracy"] == stage["accuracy/start"]
    assert summary["dpo/accuracy"] == stage["accuracy/end"]
    assert all(0.0 <= summary[k] <= 1.0 for k in ("sft/accuracy", "dpo/accuracy", "dpo/preference_accuracy"))
    assert load_config(out / "dpo" / "config.yaml", stage="dpo").dpo.model_path == str(out / "sft" / "model")
    assert [r["step"] for r in rows(out / "dpo" / "metrics.jsonl") if "eval/accuracy" in r] == [4, 8]
    assert (out / "curves.png").stat().st_size > 10_000

    from transformers import AutoModelForCausalLM

    sft, trained = (AutoModelForCausalLM.from_pretrained(out / name / "model").state_dict()
                    for name in ("sft", "dpo"))
    assert sft.keys() == trained.keys() and any(not torch.equal(sft[k], trained[k]) for k in sft)
