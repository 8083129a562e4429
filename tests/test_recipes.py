"""Reasoning-RL recipes on the real actors (Ray, vLLM, DeepSpeed): DAPO's dynamic sampling and
overlong shaping, GSPO's sequence-level ratio, CISPO's clipped weights, truncated responses masked."""

import json
import math

import pytest

from rayrlhf.config import load_config
from rayrlhf.driver import train
from rayrlhf.errors import RayRLHFError

pytestmark = pytest.mark.integration


def run(tmp_path, policy, *overrides):
    """conf/tiny_dapo.yaml's GRPO stage from the random tiny policy, rewarded by `alphabet` (the
    share of the first 8 letters that follow their predecessor), 8 prompts x 4 samples a step."""
    cfg = load_config("conf/tiny_dapo.yaml", [
        f"model.path={policy}", "model.build_tiny=false", f"output_dir={tmp_path / 'run'}",
        "reward.function=alphabet", "trainer.total_steps=3", "trainer.prompts_per_step=8",
        "algorithm.train_batch_size=16", "actor.micro_batch_size=16", "eval.every=0",
        "eval.before_training=false", *overrides])
    return train(cfg)


def test_dapo_trains_on_full_batches_of_groups_whose_rewards_differ(tmp_path, ray_cluster, tiny_policy):
    """Every logged sample of a step (all 32): each prompt's 4 rewards differ, although groups were
    dropped on the way; the overlong penalty is DAPO's over the last 3 of 12 tokens; and the batch
    joined from several rounds (re-padded) still gives the trainer the engine's log-probs."""
    history = run(tmp_path, tiny_policy, "logging.samples_per_step=32",
                  "algorithm.dynamic_sampling.max_extra_rounds=8")
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    for metrics in history:
        step = [r for r in records if r["step"] == metrics["step"]]
        assert len(step) == 32 and metrics["dynamic_sampling/shortfall"] == 0
        groups = [step[i:i + 4] for i in range(0, 32, 4)]
        assert all(len({r["prompt"] for r in g}) == 1 and len({r["reward"] for r in g}) > 1 for g in groups)
        penalties = [-0.5 * min(max(r["response_tokens"] - 9, 0), 3) / 3 for r in step]
        assert math.isclose(metrics["reward/overlong_penalty"], sum(penalties) / 32, rel_tol=1e-5,
                            abs_tol=1e-7)
        assert metrics["sync/logprob_gap_mean"] < 1e-4
        assert "kl/mean" not in metrics  # no KL: no reference actor
    assert sum(m["dynamic_sampling/groups_dropped"] for m in history) > 0
    assert all(m["dynamic_sampling/rounds"] >= 1 for m in history)


NO_SIGNAL = '''
def same(prompts, responses, **fields):
    return [1.0] * len(responses)
'''


def test_dynamic_sampling_without_any_signal_stops_naming_the_rounds(tmp_path, ray_cluster, tiny_policy):
    rewards = tmp_path / "constant.py"
    rewards.write_text(NO_SIGNAL)
    with pytest.raises(RayRLHFError, match=r"step 1: dynamic sampling found no prompt group whose rewards "
                                           r"differ in 2 rounds \(24 groups of rollout.n=4\)"):
        run(tmp_path, tiny_policy, f"reward.function={rewards}:same",
            "algorithm.dynamic_sampling.max_extra_rounds=1")


@pytest.mark.parametrize("recipe", [
    # GSPO's clip range around a sequence-level ratio, two epochs (so the ratio moves), the sequence
    # mean loss; truncated responses masked out of the loss.
    ("algorithm.ratio_level=sequence", "algorithm.clip_eps=3e-4", "algorithm.clip_eps_high=4e-4",
     "algorithm.loss_agg=seq_mean_token_mean", "algorithm.ppo_epochs=2", "algorithm.mask_truncated=true"),
    ("algorithm.policy_loss=cispo", "algorithm.clip_eps=0.9", "algorithm.clip_eps_high=0.28",
     "algorithm.ppo_epochs=2"),
], ids=["gspo", "cispo"])
def test_sequence_ratio_and_clipped_weights_train_on_the_real_stack(tmp_path, ray_cluster, tiny_policy,
                                                                    recipe):
    history = run(tmp_path, tiny_policy, "algorithm.dynamic_sampling.enable=false",
                  "reward.overlong_buffer=0", *recipe)
    assert all(math.isfinite(m["loss/policy"]) and math.isfinite(m["policy/ratio_mean"]) for m in history)
    assert all(m["sync/logprob_gap_mean"] < 1e-4 for m in history)
    # The second epoch's ratios left the range somewhere (GSPO's is 3e-4 wide).
    assert any(m["policy/clip_frac"] > 0 for m in history)
