"""End to end on a real local Ray cluster: vLLM engines, DeepSpeed ZeRO ranks, reference and reward
actors, weight sync, and the saved checkpoint. Tiny models, a few iterations each."""

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from rayrlhf.config import load_config
from rayrlhf.driver import train
from rayrlhf.errors import RewardError

pytestmark = pytest.mark.integration

REQUIRED_METRICS = ["step", "reward/mean", "kl/mean", "loss/policy", "loss/value",
                    "response/length_mean", "time/generate", "time/experience", "time/train",
                    "time/weight_sync", "time/step", "throughput/tokens_per_s",
                    *(f"memory/{role}_rss_gib"
                      for role in ("rollout", "reference", "reward", "actor", "critic")),
                    *(f"time/role/{call}" for call in ("rollout_generate", "reward_scores", "actor_infer",
                                                       "reference_logprobs", "critic_infer", "actor_train",
                                                       "critic_train"))]


def small_config(tmp_path, policy, *overrides):
    return load_config("conf/tiny_ppo.yaml", [
        f"model.path={policy}", "model.build_tiny=false", f"output_dir={tmp_path / 'run'}",
        "trainer.total_steps=2", "trainer.prompts_per_step=16", "algorithm.train_batch_size=8",
        "actor.micro_batch_size=4", "critic.micro_batch_size=4", *overrides])


def wait_for_resources_released(ray, timeout_s=30.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU"):
            return True
        time.sleep(0.5)
    return False


def check_run(cfg, history, initial_policy):
    out = Path(cfg.output_dir)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(history) == cfg.trainer.total_steps
    for metrics in lines:
        for key in REQUIRED_METRICS:
            assert key in metrics and math.isfinite(metrics[key]), key
    # The step-2 samples came from engines refreshed after step 1's training: their log-probs
    # match the trainer's, while the policy has moved away from the reference.
    last = lines[-1]
    assert last["sync/logprob_gap_mean"] < 1e-3
    assert last["sync/bytes"] > 0
    assert not list(Path("/dev/shm").glob("rayrlhf-weights-*")), "a shared-memory weights file was left"
    assert (out / "config.yaml").exists()

    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(initial_policy).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no weight"
    return lines


def test_zero2_two_ranks_two_engines_reward_model(tmp_path, ray_cluster, tiny_policy, tiny_reward_model,
                                                  prompt_file, capsys):
    cfg = small_config(tmp_path, tiny_policy, "reward.function=", f"data.path={prompt_file}",
                       f"reward.models=[{{path: {tiny_reward_model}}}]",
                       "actor.num_ranks=2", "critic.num_ranks=2", "actor.zero_stage=2",
                       "critic.zero_stage=2", "rollout.num_engines=2", "reward.num_workers=2",
                       "ray.colocate=[[actor,reference,reward],[critic,rollout]]",
                       # Packed micro-batches of at most 24 tokens: several per minibatch.
                       "data.max_prompt_tokens=16", "actor.packing=true", "critic.packing=true",
                       "actor.micro_batch_tokens=24", "critic.micro_batch_tokens=24")
    history = train(cfg)
    lines = check_run(cfg, history, tiny_policy)
    placed = capsys.readouterr().out
    assert "rollout x2 on " in placed and "actor x2 on " in placed
    assert "weight sync by shared memory" in placed  # both engines read the file rank 0 writes
    assert re.search(r"reference x1 on [\d./a-f]+ \(bundles shared with reward, actor\)", placed), placed
    assert re.search(r"critic x2 on [\d.]+ \(bundles shared with rollout\)", placed), placed
    # A reward model's scores are continuous, unlike the rule's multiples of 1/8.
    assert lines[0]["reward/std"] > 0
    assert wait_for_resources_released(ray_cluster)


def test_zero3_two_ranks_and_checkpoint_loads_in_vllm(tmp_path, ray_cluster, tiny_policy, capsys):
    cfg = small_config(tmp_path, tiny_policy, "actor.num_ranks=2", "critic.num_ranks=2",
                       "actor.zero_stage=3", "critic.zero_stage=3", "rollout.temperature=0.8",
                       "weight_sync.transport=collective", "data.max_prompt_tokens=16",
                       "actor.micro_batch_tokens=24", "critic.micro_batch_tokens=24")
    history = train(cfg)
    check_run(cfg, history, tiny_policy)
    assert "weight sync by gloo broadcast" in capsys.readouterr().out
    assert wait_for_resources_released(ray_cluster)

    # The saved policy (gathered from ZeRO-3 shards) loads in vLLM and in transformers, and the
    # two give the same log-probs for the same tokens.
    from rayrlhf.algorithms import Sampling
    from rayrlhf.batch import build_batch
    from rayrlhf.modeling import load_causal_lm, policy_logprobs
    from rayrlhf.vllm_engine import VLLMEngine

    saved = str(Path(cfg.output_dir) / "policy")
    engine = VLLMEngine(saved, "", cfg.rollout, "float32", seed=0, max_model_len=64)
    prompts = [[10, 11, 12], [20, 21, 22, 23]]
    samples = [s[0] for s in engine.generate(prompts)]
    batch = build_batch(prompts, [s.response_ids for s in samples], pad_id=0)
    with torch.no_grad():
        trainer_side = policy_logprobs(load_causal_lm(saved, "float32"), batch, Sampling.of(cfg.rollout))
    for row, sample in enumerate(samples):
        n = len(sample.logprobs)
        assert torch.allclose(trainer_side[row, :n], torch.tensor(sample.logprobs), atol=1e-4)


def test_nan_reward_stops_the_run_and_frees_the_actors(tmp_path, ray_cluster, tiny_policy):
    from transformers import AutoModelForSequenceClassification

    from rayrlhf.tiny import build_tokenizer

    broken = tmp_path / "nan_rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_policy, num_labels=1)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    build_tokenizer().save_pretrained(broken)

    cfg = small_config(tmp_path, tiny_policy, f"reward.models=[{{path: {broken}}}]")
    with pytest.raises(RewardError,
                       match=r"reward for sample 0 is unusable: reward model .* gave nan .*prompt '"):
        train(cfg)
    assert not (Path(cfg.output_dir) / "policy").exists()
    assert wait_for_resources_released(ray_cluster)


def test_default_task_learns(tmp_path, ray_cluster, tiny_policy):
    """The built-in alphabet task: reward rises far above its starting level in 40 iterations."""
    cfg = load_config("conf/tiny_ppo.yaml", [f"model.path={tiny_policy}", "model.build_tiny=false",
                                              f"output_dir={tmp_path / 'run'}", "trainer.total_steps=40"])
    rewards = [m["reward/mean"] for m in train(cfg)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.05
    assert last > first + 0.15, rewards


def test_a_hanging_call_becomes_an_error_and_frees_the_actors(tmp_path, ray_cluster, tiny_policy):
    from rayrlhf.errors import RayRLHFError

    cfg = small_config(tmp_path, tiny_policy, "ray.call_timeout_s=0.01")
    with pytest.raises(RayRLHFError, match=r"did not finish within 0 s \(ray.call_timeout_s"):
        train(cfg)
    assert wait_for_resources_released(ray_cluster)

