"""PPO and GRPO on models shaped like the ones users train (rayrlhf.tiny.TEST_FAMILIES): real 32k and
131k-token tokenizers whose vocabularies need no padding, tied embeddings and q/k/v biases (Qwen2),
q/k norms (Qwen3), untied GQA (Mistral). The engines and the trainer must agree on the log-probs of
the sampled tokens from the very first batch, over every weight transport that runs on a CPU."""

import pytest

from rayrlhf.config import load_config
from rayrlhf.driver import train

pytestmark = pytest.mark.integration

# A reward that tells responses apart by their text, so that equal evaluation scores mean equal
# greedy responses, and GRPO groups get different scores.
FINGERPRINT = '''
def reward(prompts, responses, **fields):
    return [(sum(ord(c) * (i + 1) for i, c in enumerate(r)) % 1009) / 1009 for r in responses]
'''


def run(tmp_path, name, model, *overrides):
    rewards = tmp_path / "fingerprint.py"
    rewards.write_text(FINGERPRINT)
    cfg = load_config("conf/tiny_ppo.yaml", [
        f"model.path={model}", "model.build_tiny=false", f"output_dir={tmp_path / name}",
        f"reward.function={rewards}", "trainer.total_steps=2", "trainer.prompts_per_step=4",
        "rollout.n=2", "rollout.max_new_tokens=8", "algorithm.train_batch_size=8", "actor.micro_batch_size=8",
        "critic.micro_batch_size=8", "actor.lr=1e-4", "weight_sync.check_every=1", *overrides])
    return train(cfg)


def agree_from_the_first_batch(history):
    """Engine and trainer log-probs of the same tokens, at step 1 (weights as loaded) and after a
    sync (weights as trained)."""
    gaps = [m["sync/logprob_gap_mean"] for m in history]
    assert len(gaps) == 2 and all(gap < 1e-5 for gap in gaps), gaps
    assert all(m["sync/logprob_gap_max"] < 1e-4 for m in history), history


def test_a_131k_vocabulary_agrees_from_the_first_batch_over_either_transport(tmp_path, ray_cluster,
                                                                              realistic_models, capsys):
    """The Mistral-shaped model, once by shared memory (GRPO) and once by the gloo broadcast (PPO
    with a critic and a reference): the step-0 evaluation, before any sync, scores the same greedy
    responses either way."""
    model = realistic_models("mistral")
    evaluation = ["eval.every=2", "eval.size=8", "eval.before_training=true"]
    by_file = run(tmp_path, "shared", model, "algorithm.estimator=grpo", "algorithm.kl_coef=0",
                  *evaluation)
    assert "weight sync by shared memory" in capsys.readouterr().out
    by_broadcast = run(tmp_path, "broadcast", model, "weight_sync.transport=collective", *evaluation)
    assert "weight sync by gloo broadcast" in capsys.readouterr().out
    for history in (by_file, by_broadcast):
        agree_from_the_first_batch(history)
    step0 = [[r for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"step": 0' in r]
             for name in ("shared", "broadcast")]
    assert len(step0[0]) == 1 and step0[0] == step0[1], step0
    assert "loss/value" in by_broadcast[-1] and "kl/mean" in by_broadcast[-1]


@pytest.mark.parametrize(("family", "overrides"), [
    ("qwen2", ["actor.packing=true", "critic.packing=true"]),
    ("qwen3", ["algorithm.estimator=grpo", "algorithm.kl_in=loss", "algorithm.kl_estimator=k3",
               "actor.packing=true", "weight_sync.transport=collective"]),
])
def test_ppo_and_grpo_on_tied_embeddings_qkv_biases_and_qk_norms(tmp_path, ray_cluster, realistic_models,
                                                                 family, overrides):
    history = run(tmp_path, family, realistic_models(family), *overrides)
    agree_from_the_first_batch(history)
    assert all(m["loss/policy"] == m["loss/policy"] for m in history)  # finite, not NaN
