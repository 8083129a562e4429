"""Critic-free estimators, KL options, reward sources and decoding, on the real actors."""

import math

import pytest
import torch

from rayrlhf.config import load_config
from rayrlhf.driver import train
from rayrlhf.errors import RewardError

pytestmark = pytest.mark.integration

REWARD_FILE = '''
import math

def first_letter(prompts, responses, target):
    hits = [float(r[:1] == t) for r, t in zip(responses, target)]
    return {"reward": hits, "first_ok": hits}

def nan_on_vowels(prompts, responses, **fields):
    return [math.nan if set(r) & set("aeiou") else 1.0 for r in responses]
'''


@pytest.fixture
def task(tmp_path, prompt_file):
    """The prompt file (with its `target` column) and a file of user reward functions."""
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(REWARD_FILE)
    return prompt_file, str(rewards)


def run(tmp_path, policy, *overrides):
    cfg = load_config("conf/tiny_ppo.yaml", [
        f"model.path={policy}", "model.build_tiny=false", f"output_dir={tmp_path / 'run'}",
        "trainer.total_steps=2", "trainer.prompts_per_step=8", "algorithm.train_batch_size=16",
        "actor.micro_batch_size=8", "critic.micro_batch_size=8", *overrides])
    return train(cfg)


def finite(history, *keys):
    return all(math.isfinite(m[k]) for m in history for k in keys)


def test_grpo_with_a_user_reward_file_dataset_fields_and_eval(tmp_path, ray_cluster, tiny_policy, task):
    data, rewards = task
    history = run(tmp_path, tiny_policy, "algorithm.estimator=grpo", "rollout.n=4",
                  f"data.path={data}", f"reward.function={rewards}:first_letter",
                  "eval.every=2", f"eval.path={data}", "eval.size=16",
                  "algorithm.kl_target=0.001", "algorithm.kl_horizon=100",
                  # Each prompt once per micro-batch of about 40 tokens, before its 4 responses.
                  "actor.packing=true", "actor.micro_batch_tokens=40", "data.max_prompt_tokens=16",
                  # One ZeRO-0 rank keeps its weights in the shared file the engines load from.
                  "actor.zero_stage=0")
    assert "loss/value" not in history[-1]  # no critic was started
    # Adaptive KL: at step 1 the policy is the reference (KL 0 up to the rounding of the packed
    # layout, below target), so beta shrinks.
    assert abs(history[0]["kl/mean"]) < 1e-6 and history[1]["kl/coef"] < history[0]["kl/coef"]
    assert finite(history, "loss/policy", "kl/mean", "reward/first_ok")
    assert "eval/reward_mean" in history[1] and "eval/first_ok" in history[1]
    assert "eval/reward_mean" not in history[0]
    assert history[-1]["sync/logprob_gap_mean"] < 1e-3


def test_rloo_without_kl_and_with_async_rollouts(tmp_path, ray_cluster, tiny_policy, task):
    """RLOO starts no reference. Asynchronously, batches 2 and 3 go to the engines before step 1
    trains; each step trains on samples from weights at most max_staleness updates old. One
    optimizer step per batch: pi_old's log-probs come from the training forward, with no pass of
    their own, and still match the engine's row for row."""
    data, rewards = task
    history = run(tmp_path, tiny_policy, "algorithm.estimator=rloo", "rollout.n=2", "algorithm.kl_coef=0",
                  f"data.path={data}", f"reward.function={rewards}:first_letter", "trainer.total_steps=4",
                  "trainer.async_rollout=true", "trainer.max_staleness=2", "algorithm.tis_cap=2.0",
                  "algorithm.ppo_epochs=1", "actor.packing=true")
    assert "kl/mean" not in history[-1] and "loss/value" not in history[-1]
    assert finite(history, "loss/policy", "reward/mean")
    assert [m["rollout/staleness"] for m in history] == [0, 1, 2, 2]
    assert "sync/logprob_gap_mean" in history[0] and "sync/logprob_gap_mean" not in history[1]
    assert history[0]["sync/logprob_gap_mean"] < 1e-3
    assert all("time/role/actor_infer" not in m for m in history)
    assert all(m["policy/ratio_mean"] == 1.0 and m["policy/clip_frac"] == 0.0 for m in history)


def test_reinforce_pp_with_kl_loss_and_every_loss_option(tmp_path, ray_cluster, tiny_policy, task):
    data, rewards = task
    history = run(tmp_path, tiny_policy, "algorithm.estimator=reinforce_pp_baseline", "rollout.n=2",
                  f"data.path={data}", f"reward.function={rewards}:first_letter",
                  "algorithm.kl_in=loss", "algorithm.kl_estimator=k3", "algorithm.kl_coef=0.1",
                  "algorithm.dual_clip=3", "algorithm.clip_eps_high=0.28", "algorithm.entropy_coef=0.01",
                  "algorithm.loss_agg=seq_mean_token_sum_norm", "algorithm.tis_cap=2.0",
                  "reward.truncated_penalty=-0.5", "reward.normalize=true", "reward.clip=3",
                  "algorithm.ppo_epochs=1", "rollout.top_p=0.95", "rollout.top_k=30",
                  "rollout.repetition_penalty=1.1")
    assert finite(history, "loss/policy", "loss/kl", "policy/entropy", "kl/mean")
    assert history[-1]["loss/kl"] >= 0  # k3 never goes negative
    # The trainer's log-probs are of the engines' truncated, penalised distribution too.
    assert history[0]["sync/logprob_gap_mean"] < 1e-4
    # KL in the loss and one optimizer step per batch: no separate old-log-prob pass.
    assert "time/role/actor_infer" not in history[-1] and "time/role/reference_logprobs" in history[-1]


def test_bad_rewards_stop_the_run_or_are_skipped(tmp_path, ray_cluster, tiny_policy, task):
    data, rewards = task
    args = (f"data.path={data}", f"reward.function={rewards}:nan_on_vowels", "rollout.n=2")
    with pytest.raises(RewardError, match=rf"reward function '{rewards}:nan_on_vowels' gave nan"):
        run(tmp_path, tiny_policy, *args)
    history = run(tmp_path, tiny_policy, *args, "reward.skip_invalid=true")
    assert all(m["reward/invalid"] > 0 for m in history)
    assert finite(history, "loss/policy", "loss/value")


def test_remote_reward_model_over_loopback(tmp_path, ray_cluster, tiny_policy, tiny_reward_model, task):
    from rayrlhf.reward_server import make_server

    with make_server(tiny_reward_model, token="s3cret") as server:
        history = run(tmp_path, tiny_policy, "reward.function=", "rollout.n=2", f"data.path={task[0]}",
                      f'reward.remote=[{{url: "{server.url}", token: s3cret}}]', "reward.remote_timeout_s=10")
    assert history[0]["reward/std"] > 0  # a model's continuous scores, not a rule's
    assert finite(history, "loss/policy", "loss/value")


def test_decoding_options_in_the_engine(tiny_policy):
    """Stop strings, n samples, greedy decoding; and with top-k, top-p, a repetition penalty and a
    temperature, the engine's log-probs and the trainer's mean the same distribution."""
    from rayrlhf.algorithms import Sampling
    from rayrlhf.batch import build_batch
    from rayrlhf.modeling import load_causal_lm, policy_logprobs
    from rayrlhf.vllm_engine import VLLMEngine

    cfg = load_config("conf/tiny_ppo.yaml", ["rollout.stop=[e]", "rollout.n=3", "rollout.top_k=20",
                                             "rollout.top_p=0.9", "rollout.repetition_penalty=1.2",
                                             "rollout.temperature=0.8", "rollout.max_new_tokens=12"])
    engine = VLLMEngine(tiny_policy, "", cfg.rollout, "float32", seed=0, max_model_len=64)
    prompts = [[10, 11, 12], [20, 21]] * 8
    sampled = engine.generate(prompts)
    assert all(len(group) == 3 for group in sampled)
    samples = [s for group in sampled for s in group]
    eos = engine.llm.get_tokenizer().eos_token_id
    for s in samples:
        assert len(s.response_ids) <= 12
        if s.finished:  # at the stop string (kept in the text) or at EOS
            assert s.text.endswith("e") or s.response_ids[-1] == eos
        else:
            assert "e" not in s.text and len(s.response_ids) == 12
    assert any(s.text.endswith("e") for s in samples)  # some responses did stop at "e"
    greedy = [g[0].response_ids for g in engine.generate(prompts, greedy=True)]
    assert greedy == [g[0].response_ids for g in engine.generate(prompts, greedy=True)]
    assert all(len(g) == 1 for g in engine.generate(prompts, greedy=True))
    assert torch.tensor([lp for s in samples for lp in s.logprobs]).isfinite().all()
    flat_prompts = [p for p in prompts for _ in range(3)]
    batch = build_batch(flat_prompts, [s.response_ids for s in samples], pad_id=0)
    with torch.no_grad():
        policy = load_causal_lm(tiny_policy, "float32")
        trainer_side = policy_logprobs(policy, batch, Sampling.of(cfg.rollout))
    gaps = [(trainer_side[row, :len(s.logprobs)] - torch.tensor(s.logprobs)).abs().max() for row, s in
            enumerate(samples)]
    assert max(gaps) < 1e-4, max(gaps)
