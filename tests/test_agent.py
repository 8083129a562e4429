"""Multi-turn rollouts (rayrlhf.agent): the masks in the math, the tool-calling environment, the
observation tokens, and trajectories run on the real vLLM engine."""

import asyncio
import time

import pytest
import torch

from rayrlhf import agent
from rayrlhf import algorithms as alg
from rayrlhf.config import load_config
from rayrlhf.errors import EnvironmentFailure

# A trajectory's response region: model turn (3 tokens), observation (2), model turn (2), padding.
MASK = torch.tensor([[1., 1., 1., 0., 0., 1., 1., 0.]])
MODEL = MASK[0].bool()


def test_the_score_lands_on_the_last_model_token():
    assert alg.last_valid(MASK).tolist() == [6]
    assert alg.last_valid(torch.tensor([[0., 0.], [1., 0.]])).tolist() == [0, 0]
    rewards = alg.token_rewards(torch.tensor([2.0]), torch.zeros(1, 8), MASK, 0.1)
    assert rewards.tolist() == [[0, 0, 0, 0, 0, 0, 2.0, 0]]


def test_advantages_on_a_trajectory_are_those_of_its_model_tokens_alone():
    """Observation tokens pass the future through untouched: GAE and the critic-free returns over
    the gapped mask equal those over the model's tokens laid end to end, and are 0 elsewhere."""
    rewards = torch.tensor([[0.1, -0.2, 0.3, 9.0, 9.0, 0.05, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0, 7.0, 0.2, 0.1, 7.0]])
    compact = torch.ones(1, 5)
    adv, ret = alg.gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    adv_c, ret_c = alg.gae(rewards[:, MODEL], values[:, MODEL], compact, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[:, MODEL], adv_c)
    torch.testing.assert_close(ret[:, MODEL] * 1.0, ret_c)
    assert adv[:, ~MODEL].abs().sum() == 0
    returns = alg.discounted_returns(rewards, MASK, 0.9)
    torch.testing.assert_close(returns[:, MODEL], alg.discounted_returns(rewards[:, MODEL], compact, 0.9))
    assert returns[:, ~MODEL].abs().sum() == 0
    # Hand-computed, gamma 1: the returns of the model tokens are the sums of their futures.
    torch.testing.assert_close(alg.discounted_returns(rewards, MASK, 1.0)[0, MODEL],
                               torch.tensor([1.25, 1.15, 1.35, 1.05, 1.0]))


def test_losses_and_kl_count_the_model_tokens_only():
    per_token = torch.tensor([[1., 2., 3., 100., 100., 4., 5., 100.]])
    assert alg.aggregate(per_token, MASK, "token_mean").item() == 3.0
    assert alg.aggregate(per_token, MASK, "seq_mean_token_sum_norm", norm_len=5).item() == 3.0
    logprobs = torch.tensor([[-1., -1., -1., -50., -50., -1., -1., 0.]])
    loss, stats = alg.policy_loss(logprobs, logprobs.detach(), torch.ones(1, 8), MASK, 0.2)
    assert loss.item() == -1.0 and stats["ratio_mean"].item() == 1.0


def tool_cfg(tmp_path, *overrides):
    return load_config(None, ["model.path=unused", "data.task=calculator", "rollout.env=tools",
                              "rollout.tools=calculator", *overrides]).rollout


def test_the_calculator_tool_and_the_tool_environment(tmp_path):
    assert agent.calculator("17*23") == "391" and agent.calculator("(2+3)**2/5") == "5"
    with pytest.raises(ValueError, match="not arithmetic"):
        agent.calculator("__import__('os')")
    tools = tmp_path / "tools.py"
    tools.write_text("import time\n\ndef boom(x):\n    raise RuntimeError('no ' + x)\n\n"
                     "def slow():\n    time.sleep(5)\n\ndef _private():\n    pass\n")
    env = agent.environment_class(tool_cfg(tmp_path))("17*23=")
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "17*23"}}</tool_call>'
    assert env.step(f"let me see {call}") == ({"role": "tool", "content": "391"}, 0.0, False)
    assert env.step("391") == (None, 0.0, True)  # no call: the answer
    assert env.metrics == {"tool_calls": 1.0, "tool_errors": 0.0}

    own = agent.environment_class(tool_cfg(tmp_path, f"rollout.tools={tools}", "rollout.tool_timeout_s=0.2"))
    assert set(own.tools) == {"boom", "slow"}
    env = own("x")
    observation, _, done = env.step('<tool_call>{"name": "boom", "arguments": {"x": "way"}}</tool_call>'
                                    '<tool_call>{"name": "nope"}</tool_call><tool_call>{"name": </tool_call>'
                                    '<tool_call>{"name": "slow", "arguments": "{}"}</tool_call>')
    assert not done
    started = time.monotonic()
    lines = observation["content"].split("\n")
    assert lines[0] == "error: RuntimeError: no way"
    assert lines[1].startswith("error: ValueError: unknown tool 'nope' (tools: boom, slow)")
    assert lines[2].startswith("error: JSONDecodeError")
    assert lines[3] == "error: TimeoutError: the tool ran past rollout.tool_timeout_s=0.2"
    assert time.monotonic() - started < 1
    assert env.metrics == {"tool_calls": 4.0, "tool_errors": 4.0}


def test_an_environment_that_cannot_be_loaded_is_named(tmp_path):
    with pytest.raises(EnvironmentFailure, match="rollout.env 'nowhere': not the built-in `tools`"):
        agent.environment_class(tool_cfg(tmp_path, "rollout.env=nowhere", "rollout.tools=''"))
    envs = tmp_path / "envs.py"
    envs.write_text("class NoStep:\n    pass\n")
    with pytest.raises(EnvironmentFailure, match="has no class 'Missing' with a step method"):
        agent.environment_class(tool_cfg(tmp_path, f"rollout.env={envs}:Missing", "rollout.tools=''"))
    with pytest.raises(EnvironmentFailure, match="has no class 'NoStep' with a step method"):
        agent.environment_class(tool_cfg(tmp_path, f"rollout.env={envs}:NoStep", "rollout.tools=''"))
    with pytest.raises(EnvironmentFailure, match="no Python file"):
        agent.environment_class(tool_cfg(tmp_path, "rollout.tools=missing.py"))
    with pytest.raises(EnvironmentFailure, match=r"'calculater': no built-in tool set of that name "
                                                 r"\(calculator\)"):
        agent.environment_class(tool_cfg(tmp_path, "rollout.tools=calculater"))
    from rayrlhf.validation import ConfigError

    with pytest.raises(ConfigError, match="'rollout.tools' is for rollout.env=tools"):
        load_config(None, ["model.path=unused", "data.task=calculator", "rollout.tools=calculator"])
    with pytest.raises(ConfigError, match="'rollout.tools' is needed with rollout.env=tools"):
        load_config(None, ["model.path=unused", "data.task=calculator", "rollout.env=tools"])


def test_observations_continue_the_chat_template_token_for_token(realistic_models):
    """The prompt's tokens, the model's turn as sampled (ending at EOS, or cut before it) and the
    observation's tokens are exactly the template's rendering of the conversation so far."""
    from rayrlhf.modeling import load_tokenizer

    tok = load_tokenizer(realistic_models("qwen2"))  # the 131k tekken tokenizer and its template
    encoder = agent.ObservationEncoder(tok)
    user = {"role": "user", "content": "What is 17*23?"}
    prompt = tok(tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    turn = tok("Let me compute it.", add_special_tokens=False)["input_ids"]
    for observation, message in [("use the tool", {"role": "user", "content": "use the tool"}),
                                 ({"role": "tool", "content": "391"},  # tekken wants call ids
                                  {"role": "user", "content": "<tool_response>391</tool_response>"})]:
        conversation = [user, {"role": "assistant", "content": "Let me compute it."}, message]
        full = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        expected = tok(full, add_special_tokens=False)["input_ids"]
        assert prompt + turn + [tok.eos_token_id] + encoder.encode(observation, True, True) == expected
        # A turn cut before its end: the end-of-turn token comes with the observation.
        assert prompt + turn + encoder.encode(observation, True, False) == expected
    raw = encoder.encode({"role": "tool", "content": "391"}, False, False)
    assert tok.decode(raw) == "<tool_response>391</tool_response>"


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    from rayrlhf.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "agent", seed=0, tool_chars=True))


@pytest.fixture(scope="module")
def engine(tool_model):
    """One in-process vLLM engine; each test runs its own environment loop on it."""
    from rayrlhf.vllm_engine import VLLMEngine

    cfg = load_config(None, ["model.path=unused", "data.task=calculator", "rollout.max_new_tokens=6"])
    return VLLMEngine(tool_model, "", cfg.rollout, "float32", seed=0, max_model_len=128)


class Recorder:
    """Answers every turn with an observation, rewards 0.25 a step, done after three steps."""

    def __init__(self, prompt, **fields):
        self.seen = []
        self.metrics = {"steps": 0}
        RECORDED.append((prompt, self))

    def step(self, response):
        self.seen.append(response)
        self.metrics["steps"] += 1
        return f"obs{len(self.seen)}!", 0.25, len(self.seen) >= 3


RECORDED: list = []


def run(engine, env_class, *overrides, prompts=("12*34=", "56*78=", "90*12="), seeds=(5, 50, 500)):
    from rayrlhf.vllm_engine import _VLLMTurns

    cfg = load_config(None, ["model.path=unused", "data.task=calculator", "rollout.env=x.py:X",
                             "rollout.max_new_tokens=6", "rollout.n=2", *overrides]).rollout
    tok = engine.llm.get_tokenizer()
    runner = agent.EpisodeRunner(cfg, env_class, tok)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [{"prompt": p, "fields": {}, "chat": False, "row": 10 + i} for i, p in enumerate(prompts)]
    return runner.run(_VLLMTurns(engine), ids, rows, list(seeds), greedy=False), tok


def runs_of(sample):
    """The response's runs of model tokens and of observation tokens, in order."""
    out, mask = [], sample.action_mask
    for i, token in enumerate(sample.response_ids):
        if i == 0 or mask[i] != mask[i - 1]:
            out.append((mask[i], []))
        out[-1][1].append(token)
    return out


def test_a_trajectory_is_the_sampled_tokens_plus_the_tokenised_observations(engine):
    RECORDED.clear()
    groups, tok = run(engine, Recorder, "rollout.max_turns=4")
    plain = engine.llm.generate([{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]}
                                 for p in ("12*34=", "56*78=", "90*12=")],
                                [engine.sampling_params(2, 6, seed, False) for seed in (5, 50, 500)],
                                use_tqdm=False)
    assert [len(g) for g in groups] == [2, 2, 2] and len(RECORDED) == 6
    for i, (group, single) in enumerate(zip(groups, plain, strict=True)):
        envs = RECORDED[2 * i:2 * i + 2]
        for sample, (seen_prompt, env), first in zip(group, envs, single.outputs, strict=True):
            assert seen_prompt == ("12*34=", "56*78=", "90*12=")[i]
            runs = runs_of(sample)
            assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
            assert [tok.decode(ids, skip_special_tokens=True) for m, ids in runs if m] == env.seen
            assert [ids for m, ids in runs if not m] == [tok("obs1!", add_special_tokens=False)["input_ids"],
                                                         tok("obs2!", add_special_tokens=False)["input_ids"]]
            # Turn 0 is what a single-turn rollout samples from the same seed.
            assert runs[0][1] == list(first.token_ids)
            logprobs = torch.tensor(sample.logprobs)
            mask = torch.tensor(sample.action_mask).bool()
            assert (logprobs[~mask] == 0).all() and (logprobs[mask] < 0).all()
            # Done by the environment; finished too where the last turn ended before max_new_tokens.
            assert sample.finished == (runs[-1][1][-1] == tok.eos_token_id)
            assert sample.env_reward == 0.75 and sample.env_error is None
            # What reward functions read: the turns as decoded, the observations' text between them.
            assert sample.text == "obs1!".join(env.seen[:2]) + "obs2!" + env.seen[2]
            assert sample.env_metrics["turns"] == 3 and sample.env_metrics["steps"] == 3


class Endless:
    def __init__(self, prompt, **fields):
        pass

    async def step(self, response):  # an async environment
        await asyncio.sleep(0.01)
        return {"role": "tool", "content": "more"}, 1.0, False


def test_turn_and_token_limits_cut_a_trajectory(engine):
    groups, tok = run(engine, Endless, "rollout.max_turns=2", "rollout.max_total_tokens=100")
    for sample in (s for g in groups for s in g):
        assert not sample.finished and sample.env_metrics["turns"] == 2 and sample.env_reward == 2.0
        assert [m for m, _ in runs_of(sample)] == [1, 0, 1]
        assert tok.decode(runs_of(sample)[1][1]) == "<tool_response>more</tool_response>"
    groups, _ = run(engine, Endless, "rollout.max_turns=10", "rollout.max_total_tokens=60")
    for sample in (s for g in groups for s in g):
        assert not sample.finished and len(sample.response_ids) <= 60 and sample.env_metrics["turns"] >= 2


class FailsOnSecondStep:
    def __init__(self, prompt, **fields):
        self.prompt, self.steps = prompt, 0

    def step(self, response):
        self.steps += 1
        if self.steps == 2 and self.prompt == "56*78=":
            raise KeyError("no such state")
        return "again", 0.0, self.steps >= 3


class Hangs(FailsOnSecondStep):
    def step(self, response):
        if self.prompt == "90*12=":
            time.sleep(3)
        return None, 1.0, True


def test_an_environment_that_fails_stops_the_run_or_is_dropped(engine):
    failed = r"rollout.env 'x.py:X' failed in its step 2: KeyError: 'no such state' \(sample [01] of"
    with pytest.raises(EnvironmentFailure, match=failed + r" the prompt '56\*78=', dataset row 11, after 2 "):
        run(engine, FailsOnSecondStep)
    groups, _ = run(engine, FailsOnSecondStep, "rollout.env_errors=skip")
    errors = [[s.env_error for s in g] for g in groups]
    assert errors[0] == errors[2] == [None, None]
    assert errors[1] == ["step 2: KeyError: 'no such state'"] * 2
    started = time.monotonic()
    with pytest.raises(EnvironmentFailure, match=r"the step ran past rollout.env_timeout_s=0.5 \(sample [01] "
                                                 r"of the prompt '90\*12='"):
        run(engine, Hangs, "rollout.env_timeout_s=0.5")
    assert time.monotonic() - started < 2.5
    groups, _ = run(engine, Hangs, "rollout.env_timeout_s=0.5", "rollout.env_errors=skip")
    assert [s.env_error is None for g in groups for s in g] == [True, True, True, True, False, False]


def test_seeded_prompts_beyond_one_step_of_prefill_sample_on_cpu(engine):
    """More prompt tokens than one engine step prefills (4,096): on CPU a prompt split across steps
    would need its seeded generator rewound, which vLLM cannot do there; prefills stay whole."""
    prompts = [[10 + (i + j) % 30 for j in range(100)] for i in range(64)]
    samples = engine.generate(prompts, seeds=list(range(0, 128, 2)))
    assert all(len(s.response_ids) > 0 for group in samples for s in group)


def test_the_readme_environment_runs_on_the_engine(engine, tmp_path):
    """The README's complete example file, as a user would copy it, through the engine's loop."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parent.parent / "README.md"
    code = re.search(r"<!-- env-example[^\n]*\n```python\n(.*?)```", readme.read_text(), re.DOTALL).group(1)
    (tmp_path / "guess_env.py").write_text(code)
    cfg = tool_cfg(tmp_path, f"rollout.env={tmp_path / 'guess_env.py'}:GuessNumber", "rollout.tools=''")
    env_class = agent.environment_class(cfg)
    env = env_class("Guess my number.", target=7)
    assert env.step("is it 3?") == ("higher", 0.0, False)
    assert env.step("no idea") == ("Say a number.", -0.1, False)
    assert env.step("7") == (None, 1.0, True) and env.metrics == {"guesses": 3}
    from rayrlhf.vllm_engine import _VLLMTurns

    cfg = load_config(None, ["model.path=unused", "data.task=calculator", "rollout.env=guess_env.py:G",
                             "rollout.max_new_tokens=4", "rollout.max_turns=3"]).rollout
    tok = engine.llm.get_tokenizer()
    runner = agent.EpisodeRunner(cfg, env_class, tok)
    rows = [{"prompt": "guess=", "fields": {"target": str(t)}, "chat": False} for t in (1, 2)]
    groups = runner.run(_VLLMTurns(engine), [tok("guess=", add_special_tokens=False)["input_ids"]] * 2, rows,
                        [1, 2], greedy=True)
    for (sample,) in groups:
        assert 1 <= sample.env_metrics["turns"] == sample.env_metrics["guesses"] <= 3


def ppo_rows(path):
    import json

    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_agent(tmp_path_factory, ray_cluster):
    """conf/tiny_agent.yaml end to end on the real stack (SFT on DeepSpeed, GRPO with vLLM engines
    running the tool environment), cut to 10 GRPO iterations."""
    from rayrlhf.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("tiny_agent")
    cfg = load_config("conf/tiny_agent.yaml", [f"output_dir={out}", f"model.path={out / 'model'}",
                                               "trainer.total_steps=10", "eval.size=64",
                                               "logging.samples_per_step=16"], stage=None)
    return out, run_pipeline(cfg)


@pytest.mark.integration
def test_the_tiny_agent_learns_to_call_the_calculator(tiny_agent):
    import json
    import re

    out, summary = tiny_agent
    rows = ppo_rows(out / "ppo")
    before, after = rows[0], rows[-1]
    assert before["step"] == 0 and after["step"] == 10
    # SFT demonstrated the tool a third of the time; GRPO finds that calling it is right.
    assert after["eval/used_tool"] > before["eval/used_tool"] + 0.3, (before, after)
    assert after["eval/rule_score"] > before["eval/rule_score"] + 0.2, (before, after)
    assert summary["ppo/accuracy"] == after["eval/rule_score"]
    training = rows[1:]
    assert training[-1]["rollout/turns_mean"] > 1.5 and training[-1]["rollout/tool_calls"] > 0.5
    # Engine and trainer log-probs agree on every multi-turn batch: the trainer scores the tokens
    # sampled, laid out as the engine saw them, with observations masked out.
    assert all(r["sync/logprob_gap_mean"] < 1e-4 for r in training)
    assert all(r["rollout/env_failures"] == 0 for r in training)
    # The tool's responses in the trajectories are the calculator's values of the model's calls.
    samples = [json.loads(line) for line in (out / "ppo" / "samples.jsonl").read_text().splitlines()]
    called = [s for s in samples if "</tool_response>" in s["response"]]
    assert len(called) > 20
    for s in called:
        expression = re.search(r'"expression": "([^"]*)"', s["response"])
        value = re.search(r"<tool_response>(.*?)</tool_response>", s["response"]).group(1)
        if expression and value and not value.startswith("error"):
            assert value == agent.calculator(expression.group(1))


@pytest.mark.integration
def test_an_agent_run_resumes_with_asynchronous_rollouts(tiny_agent, tmp_path):
    """Asynchronous PPO with a critic (GAE over the model's tokens) through the environment, from the
    SFT policy, the engine colocated with the actor: staleness is counted per trajectory batch, and
    a run resumed from its step-2 checkpoint trains on exactly what the uninterrupted one did."""
    import math

    from rayrlhf.driver import train

    out, _ = tiny_agent

    def run(where, *more):
        return train(load_config("conf/tiny_agent.yaml", [
            f"model.path={out / 'sft' / 'model'}", "model.build_tiny=false", f"output_dir={where}",
            "trainer.total_steps=4", "trainer.prompts_per_step=16", "algorithm.train_batch_size=64",
            "trainer.async_rollout=true", "algorithm.tis_cap=2.0", "trainer.checkpoint_every=2",
            "algorithm.estimator=gae", "critic.micro_batch_size=64", "ray.colocate=[[rollout, actor]]",
            "eval.every=0", *more]))

    whole = run(tmp_path / "whole")
    assert [m["rollout/staleness"] for m in whole] == [0, 1, 1, 1]
    rest = run(tmp_path / "resumed", f"resume={tmp_path / 'whole' / 'checkpoints' / 'step_000002'}")
    assert [m["step"] for m in rest] == [3, 4]
    for resumed, uninterrupted in zip(rest, whole[2:], strict=True):
        for key in ("reward/mean", "rollout/turns_mean", "rollout/tool_calls", "response/length_mean",
                    "loss/policy", "loss/value", "values/mean", "rollout/staleness"):
            assert math.isclose(resumed[key], uninterrupted[key], rel_tol=1e-4, abs_tol=1e-6), key
