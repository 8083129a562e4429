"""PPO and GRPO on models shaped like the ones users train (rayrlhf.tiny.TEST_FAMILIES): real 32k and
131k-token tokenizers whose vocabularies need no padding, tied embeddings and q/k/v biases (Qwen2),
q/k norms (Qwen3), untied GQA (Mistral). The engines and the trainer must agree on the log-probs of
the sampled tokens from the very first batch, over every weight transport that runs on a CPU."""

import json

import pytest
import torch

from rayrlhf.config import load_config
from rayrlhf.driver import train
from rayrlhf.rewards import BUILTIN

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
    # Tensor-parallel (2 workers, each its shard of the tied embedding and head), by the broadcast.
    ("qwen3", ["algorithm.estimator=grpo", "algorithm.kl_in=loss", "algorithm.kl_estimator=k3",
               "actor.packing=true", "weight_sync.transport=collective", "rollout.tensor_parallel_size=2",
               "rollout.cpus_per_engine=2"]),
])
def test_ppo_and_grpo_on_tied_embeddings_qkv_biases_and_qk_norms(tmp_path, ray_cluster, realistic_models,
                                                                 family, overrides):
    history = run(tmp_path, family, realistic_models(family), *overrides)
    agree_from_the_first_batch(history)
    assert all(m["loss/policy"] == m["loss/policy"] for m in history)  # finite, not NaN


def stopping_model(source: str, target) -> str:
    """The model at `source` with its EOS output row turned so that about one sampled token in
    1,400 is EOS (measured on these hidden-64 models: the EOS logit is 3.5 (h . u), h of norm ~8):
    its responses stop at EOS or run to max_new_tokens, as a real policy's do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
        head[model.config.eos_token_id] = 3.5 * direction / direction.norm()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return str(target)


def test_grpo_on_a_chat_dataset_with_the_math_reward_and_long_responses(tmp_path, ray_cluster,
                                                                        realistic_models, capsys):
    """GRPO as users run it on GSM8K-style data: conversations with a system turn through the real
    131k-token tokenizer's chat template, the math reward (with the format one at 0.1) reading the
    dataset's answer column, and responses of up to 1,024 tokens, some stopped at EOS and some
    cut; a row over data.max_prompt_tokens is left out and counted. Engine and trainer agree on
    every token's log-prob, and the logged rewards are the math reward's verdict on the logged
    responses."""
    rows = [{"prompt": [{"role": "system", "content": "Think, then put the final answer in \\boxed{}."},
                        {"role": "user", "content": f"What is {a} + {b}?"}],
             "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in [(2, 3), (10, 7), (41, 1), (6, 6)]]
    too_long = {"prompt": [{"role": "user", "content": "What is " + " + ".join(["1"] * 100) + "?"}],
                "answer": "100"}
    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(map(json.dumps, [*rows[:2], too_long, *rows[2:]])))
    model = stopping_model(realistic_models("qwen2"), tmp_path / "policy")
    max_new = 1024
    history = run(tmp_path, "math", model, f"data.path={data}", "data.max_prompt_tokens=128",
                  "data.overlong_prompts=drop",
                  f"rollout.max_new_tokens={max_new}", "rollout.n=4", "algorithm.estimator=grpo",
                  "trainer.total_steps=1", "algorithm.ppo_epochs=1", "algorithm.kl_coef=0",
                  "algorithm.train_batch_size=16", "actor.micro_batch_size=4",
                  "actor.packing=true", "reward.function=math",
                  "reward.functions=[{function: format, weight: 0.1}]", "logging.samples_per_step=16")
    (metrics,) = history
    assert "left out 1 of 5 prompts over data.max_prompt_tokens=128" in capsys.readouterr().out
    assert metrics["sync/logprob_gap_mean"] < 1e-5 and metrics["sync/logprob_gap_max"] < 1e-4, metrics
    assert 0 <= metrics["reward/math_answered"] <= 1 and "reward/format" in metrics
    samples = [json.loads(line) for line in (tmp_path / "math" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all(s["prompt"][0]["role"] == "system" for s in samples)
    # Each sample drew its own random numbers: no two responses alike.
    assert len({s["response"] for s in samples}) == 16
    cut = [s for s in samples if s["truncated"]]
    assert 0 < len(cut) < len(samples), [s["response_tokens"] for s in samples]
    assert all(s["response_tokens"] == max_new for s in cut)
    assert max(s["response_tokens"] for s in samples if not s["truncated"]) > 256
    answers = {json.dumps(r["prompt"]): r["answer"] for r in rows}
    for s in samples:
        correct = BUILTIN["math"]([s["prompt"]], [s["response"]], answer=[answers[json.dumps(s["prompt"])]])
        formatted = BUILTIN["format"]([s["prompt"]], [s["response"]])
        assert s["reward"] == pytest.approx(correct["reward"][0] + 0.1 * formatted[0])


TUTOR = '''
class Tutor:
    """Replies to the first two turns with a tool message, then ends; rewards each turn by its length."""

    def __init__(self, prompt, **fields):
        self.turns = 0

    def step(self, response):
        self.turns += 1
        if self.turns == 3:
            return None, 0.0, True
        return {"role": "tool", "content": f"try again {self.turns}"}, len(response) / 100, False
'''


def test_multi_turn_grpo_through_the_chat_template_on_a_131k_vocabulary(tmp_path, ray_cluster,
                                                                        realistic_models):
    """Trajectories of three turns on conversations through the real tokenizer's chat template
    (the observations as the template writes them; tekken wants call ids for tool messages, so
    they go as user turns), packed: engine and trainer agree on the model's tokens after the
    observations, from the first batch."""
    env = tmp_path / "tutor.py"
    env.write_text(TUTOR)
    rows = [{"prompt": [{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": f"What is {a} times {b}?"}]} for a, b in [(2, 3), (7, 8)]]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(map(json.dumps, rows)))
    history = run(tmp_path, "agent", realistic_models("qwen2"), f"data.path={data}",
                  f"rollout.env={env}:Tutor", "rollout.max_turns=3", "rollout.max_new_tokens=12",
                  "rollout.max_total_tokens=120", "trainer.prompts_per_step=2", "rollout.n=4",
                  "algorithm.estimator=grpo", "algorithm.kl_coef=0", "actor.packing=true",
                  "logging.samples_per_step=8")
    agree_from_the_first_batch(history)
    assert all(m["rollout/turns_mean"] > 1.5 and m["rollout/env_failures"] == 0 for m in history), history
    samples = [json.loads(line) for line in (tmp_path / "agent" / "samples.jsonl").read_text().splitlines()]
    continued = [s for s in samples if "<tool_response>try again 1</tool_response>" in s["response"]]
    assert len(continued) >= len(samples) // 2, [s["response"] for s in samples]


# Half the prompts (those that start with a-m) get the same reward whatever the response: their
# groups teach nothing, and dynamic sampling must drop them.
HALF_SILENT = FINGERPRINT + '''

def half_silent(prompts, responses, **fields):
    scores = reward(prompts, responses)
    return [0.0 if p[0] <= "m" else s for p, s in zip(prompts, scores)]
'''


def test_dapo_joins_rounds_on_a_131k_vocabulary(tmp_path, ray_cluster, realistic_models):
    """Dynamic sampling on the Qwen2 shape (tied embeddings, q/k/v biases): batches joined from several
    rounds, re-padded with the real tokenizer's pad id, still give the trainer the engine's log-probs;
    GSPO's sequence-level ratio and the overlong penalty on the way."""
    rewards = tmp_path / "half_silent.py"
    rewards.write_text(HALF_SILENT)
    history = run(tmp_path, "dapo", realistic_models("qwen2"), f"reward.function={rewards}:half_silent",
                  "algorithm.estimator=grpo", "algorithm.kl_coef=0", "algorithm.ratio_level=sequence",
                  "algorithm.loss_agg=seq_mean_token_mean", "algorithm.dynamic_sampling.enable=true",
                  "algorithm.dynamic_sampling.max_extra_rounds=8", "reward.overlong_buffer=4")
    agree_from_the_first_batch(history)
    assert sum(m["dynamic_sampling/groups_dropped"] for m in history) > 0
    assert all(m["dynamic_sampling/shortfall"] == 0 and m["dynamic_sampling/rounds"] >= 1 for m in history)


def test_dpo_on_chat_pairs_with_a_131k_vocabulary(tmp_path, ray_cluster, realistic_models):
    """DPO from the Qwen2-shaped model on conversational prompts through its chat template: the ranks'
    reference log-probs (the fused 131k-vocabulary path, tied embeddings) are the training forward's
    at the first step, so its loss is log 2; the loss moves after."""
    import math

    from rayrlhf.supervised import train_supervised

    rows = [{"prompt": [{"role": "system", "content": "Answer with one word."},
                        {"role": "user", "content": f"Name a colour, number {i}."}],
             "chosen": ["Blue.", "Red.", "Green."][i % 3], "rejected": "I am not sure what you mean."}
            for i in range(40)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(map(json.dumps, rows)))
    model = realistic_models("qwen2")
    summary = train_supervised("dpo", load_config("conf/tiny_dpo.yaml", [
        f"model.path={model}", "model.build_tiny=false", f"output_dir={tmp_path / 'dpo'}",
        f"dpo.data.path={data}", "dpo.batch_size=8", "dpo.micro_batch_size=4", "dpo.max_steps=3",
        "dpo.lr=1e-4", "dpo.data.eval_fraction=0.2", "eval.function=''"], stage="dpo"))
    steps = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert math.isclose(steps[0]["loss/dpo"], math.log(2), abs_tol=1e-4), steps[0]
    assert steps[-1]["loss/dpo"] != steps[0]["loss/dpo"] and math.isfinite(summary["eval/loss"])
