"""Reward sources and bad rewards: the reward worker (used here as a plain object) and the driver's
check of its output."""

import math

import pytest
import torch

from rayrlhf.batch import build_batch
from rayrlhf.config import load_config
from rayrlhf.driver import score_rollout, shape_rewards
from rayrlhf.errors import RewardError
from rayrlhf.modeling import load_scalar_model, sequence_scores
from rayrlhf.rewards import BUILTIN
from rayrlhf.rollout_service import Rollout
from rayrlhf.scorers import RewardWorker
from rayrlhf.tiny import build_tokenizer

USER_REWARDS = '''
import math

def reward(prompts, responses, target):
    return {"reward": [float(r.startswith(t)) for r, t in zip(responses, target)],
            "length": [float(len(r)) for r in responses]}

def picky(prompts, responses, **fields):
    if any("x" in r for r in responses):
        raise ValueError("cannot score an x")
    return [1.0] * len(responses)

def miscount(prompts, responses, **fields):
    return [0.0, 0.0]

def nan_on_b(prompts, responses, **fields):
    return [math.nan if "b" in r else 0.5 for r in responses]
'''

PROMPTS = ["abc", "klm", "uvw"]
RESPONSES = ["defg", "nxyz", "bbbb"]
FIELDS = {"target": ["d", "n", "x"]}


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return str(path)


def worker(*overrides):
    cfg = load_config("conf/tiny_ppo.yaml", list(overrides))
    return RewardWorker(cfg.reward, cfg.model, cfg.data.chat_template)


def batch_of(tokenizer):
    return build_batch([tokenizer(p).input_ids for p in PROMPTS],
                       [tokenizer(r).input_ids for r in RESPONSES], tokenizer.pad_token_id)


def test_user_function_gets_dataset_fields_and_may_return_metrics(reward_file):
    out = worker(f"reward.function={reward_file}").scores(None, PROMPTS, RESPONSES, FIELDS)
    assert out["scores"].tolist() == [1.0, 1.0, 0.0]
    assert out["metrics"]["length"].tolist() == [4.0, 4.0, 4.0]
    assert out["reasons"] == {}


@pytest.mark.parametrize("name, rows, reason", [
    ("picky", {1}, "reward function '{path}:picky' failed: ValueError: cannot score an x"),
    ("miscount", {0, 1, 2}, "reward function '{path}:miscount' failed: ValueError: returned 2 values for 1"),
    ("nan_on_b", {2}, "reward function '{path}:nan_on_b' gave nan"),
])
def test_a_failing_function_is_pinned_on_its_samples(reward_file, name, rows, reason):
    out = worker(f"reward.function={reward_file}:{name}").scores(None, PROMPTS, RESPONSES, {})
    assert set(out["reasons"]) == rows
    assert all(reason.format(path=reward_file) in why for why in out["reasons"].values())
    assert [math.isnan(v) for v in out["scores"].tolist()] == [i in rows for i in range(3)]


def test_sources_combine_with_weights(tmp_path, tiny_policy):
    from rayrlhf.tiny import build_tiny_model

    rm = str(build_tiny_model(tmp_path / "rm", kind="reward", seed=3))
    tokenizer = build_tokenizer()
    batch = batch_of(tokenizer)
    out = worker(f"model.path={tiny_policy}", "reward.function=alphabet", "reward.function_weight=0.5",
                 f"reward.models=[{{path: {rm}, weight: 2.0}}]").scores(batch, PROMPTS, RESPONSES, {})
    with torch.no_grad():
        model_scores = sequence_scores(load_scalar_model(rm, "float32").eval(), batch)
    rule = torch.tensor([4 / 8, 3 / 8, 0.0])  # d e f g follow c; n (after m), y, z; nothing in bbbb
    assert torch.allclose(out["scores"], 0.5 * rule + 2.0 * model_scores, atol=1e-5)


@pytest.mark.parametrize("chat_template", [False, True])
def test_a_reward_model_of_another_tokenizer_scores_its_own_tokens_as_the_server_does(
        tiny_policy, realistic_models, chat_template):
    """The policy has the character tokenizer; the reward model is another family's (a 32k
    sentencepiece vocabulary): it must score the texts in its own tokens (the policy's ids mean
    nothing to it), the prompt in its chat template if the run uses one, and a remote server on
    the same model must give the same scores."""
    from rayrlhf.data import reward_model_batch
    from rayrlhf.modeling import load_tokenizer
    from rayrlhf.reward_server import RemoteRewardClient, make_server

    rm = realistic_models("qwen3", "reward")
    rm_tokenizer = load_tokenizer(rm)
    if chat_template:  # the sentencepiece tokenizer ships none; give it one, as a chat model has
        rm_tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
        rm_tokenizer.save_pretrained(rm + "-chat")
        load_scalar_model(rm, "float32").save_pretrained(rm + "-chat")
        rm += "-chat"
    policy_batch = batch_of(build_tokenizer())
    out = worker(f"model.path={tiny_policy}", "reward.function=", f"reward.models=[{{path: {rm}}}]",
                 f"data.chat_template={chat_template}").scores(policy_batch, PROMPTS, RESPONSES, {})
    own = reward_model_batch(rm_tokenizer, PROMPTS, RESPONSES, chat_template)
    if chat_template:
        first = own["sequences"][0][own["attention_mask"][0].bool()]
        assert first.tolist()[:3] == rm_tokenizer("[user]").input_ids[:3]
    with torch.no_grad():
        expected = sequence_scores(load_scalar_model(rm, "float32").eval(), own)
    assert torch.allclose(out["scores"], expected, atol=1e-5)
    # Conversations (a system turn first) reach the model's template as they are, here and remote.
    conversations = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": p}]
                     for p in PROMPTS]
    if chat_template:
        chats = worker(f"model.path={tiny_policy}", "reward.function=", f"reward.models=[{{path: {rm}}}]"
                       ).scores(policy_batch, conversations, RESPONSES, {})["scores"]
        own_chats = reward_model_batch(rm_tokenizer, conversations, RESPONSES, False)
        first = own_chats["sequences"][0][own_chats["attention_mask"][0].bool()]
        assert first.tolist()[:3] == rm_tokenizer("[system] be brief").input_ids[:3]
        with torch.no_grad():
            assert torch.allclose(chats, sequence_scores(load_scalar_model(rm, "float32").eval(), own_chats),
                                  atol=1e-5)
    with make_server(rm) as server:
        remote = RemoteRewardClient(server.url).score(PROMPTS, RESPONSES, chat_template)
        if chat_template:
            remote_chats = RemoteRewardClient(server.url).score(conversations, RESPONSES)
            assert torch.allclose(torch.tensor(remote_chats), chats, atol=1e-5)
    assert torch.allclose(torch.tensor(remote), expected, atol=1e-5)


def rollout_with(scores):
    tokenizer = build_tokenizer()
    batch = batch_of(tokenizer)
    batch["mask"] = torch.ones(3, 4)
    batch["truncated"] = torch.zeros(3)
    return Rollout(batch, PROMPTS, RESPONSES, {}, []), {"scores": torch.tensor(scores),
                                                     "reasons": {1: "reward function 'f' gave nan"},
                                                     "metrics": {}}


def test_unusable_reward_stops_the_run_naming_the_sample():
    rollout, rewards = rollout_with([1.0, math.nan, 0.0])
    cfg = load_config("conf/tiny_ppo.yaml", [])
    with pytest.raises(RewardError, match=r"reward for sample 1 is unusable: reward function 'f' gave nan"
                                          r".*prompt 'klm', response 'nxyz'"):
        score_rollout(rollout, rewards, cfg)


def test_skip_invalid_drops_the_sample_and_counts_it():
    rollout, rewards = rollout_with([1.0, math.nan, 0.0])
    cfg = load_config("conf/tiny_ppo.yaml", ["reward.skip_invalid=true"])
    score_rollout(rollout, rewards, cfg)
    metrics = shape_rewards(rollout, cfg.reward)
    assert metrics["reward/invalid"] == 1.0
    assert metrics["reward/mean"] == 0.5
    assert rollout.batch["mask"][1].sum() == 0 and rollout.batch["mask"][0].sum() == 4
    assert rollout.batch["scores"].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("response, reference, correct", [
    ("so the total is \\boxed{\\frac{1}{2}}", "0.5", True),
    ("She sold 48 + 24 = 72 clips.\n#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", True),
    ("That makes 1,000 in all.", "1000", True),  # the last number
    ("first \\boxed{3}, then on reflection \\boxed{x(x+2)}", "The answer is $\\boxed{x^2+2x}$.", True),
    ("It costs \\boxed{\\$18}.", "18", True),
    ("\\boxed{73}", "#### 72", False),
    ("I do not know.", "72", False),  # no answer at all
    ("\\boxed{Monday}", "Monday", True),  # math-verify parses nothing: the strings compare
])
def test_math_reward_extracts_the_final_answer_and_checks_equivalence(response, reference, correct):
    out = BUILTIN["math"](["q"], [response], answer=[reference])
    assert out["reward"] == [float(correct)]
    assert out["math_answered"] == [float(response != "I do not know.")]


def test_math_reward_finds_the_reference_in_the_usual_columns():
    math_reward = BUILTIN["math"]
    assert math_reward(["q"], ["\\boxed{4}"], solution=["so $2+2=\\boxed{4}$"])["reward"] == [1.0]
    assert math_reward(["q"], ["4"], reward_model=[{"ground_truth": "4", "style": "rule"}])["reward"] == [1.0]
    out = worker("reward.function=math").scores(None, ["q"], ["4"], {"label": ["4"]})
    assert "needs the reference answer in a column named answer, solution, ground_truth" in out["reasons"][0]


@pytest.mark.parametrize("response, score", [
    ("<think>2+2 is 4</think> The answer is \\boxed{4}.", 1.0),
    ("\\boxed{4}", 1.0),
    ("<think>2+2 is \\boxed{4}", 0.0),  # the answer inside an unclosed thought
    ("<think>hm</think> \\boxed{}", 0.0),
    ("4", 0.0),
])
def test_format_reward(response, score):
    assert BUILTIN["format"](["q"], [response]) == [score]


def test_functions_combine_with_weights_and_each_is_logged():
    responses = ["<think>ok</think> \\boxed{5}", "\\boxed{6}", "5"]
    out = worker("reward.function=math", "reward.functions=[{function: format, weight: 0.1}]").scores(
        None, ["q"] * 3, responses, {"answer": ["5", "5", "5"]})
    assert torch.allclose(out["scores"], torch.tensor([1.1, 0.1, 1.0]))
    assert out["metrics"]["math"].tolist() == [1.0, 0.0, 1.0]
    assert out["metrics"]["format"].tolist() == [1.0, 1.0, 0.0]
    assert out["metrics"]["math_answered"].tolist() == [1.0, 1.0, 1.0]
