"""Multi-turn rollouts (rollout.env): the environment contract, the built-in tool-calling
environment, and the loop that runs trajectories turn by turn on an engine.

An environment is a class, one instance per trajectory:

    class Env:
        def __init__(self, prompt, **fields): ...   # the dataset row, as reward functions get it
        def step(self, response: str) -> tuple[observation, float, bool]: ...   # may be async

`step` gets the model's last turn and returns (the next observation or None, a reward, done). An
observation is a string (a user turn) or a message {"role", "content"} (e.g. role "tool"). The
rewards of a trajectory's steps are summed into its score, beside the configured reward sources.
An environment may keep `metrics`, a dict of numbers, logged as their mean over trajectories
(rollout/<key>).

Token in, token out: the model's tokens are kept exactly as sampled, with the engine's log-probs;
only observations are tokenised and appended, never the history. `action_mask` marks the model's
tokens: the only ones trained on, in the KL, entropy and loss normalisation.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures as futures
import inspect
import json
import operator
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rayrlhf.errors import EnvironmentFailure
from rayrlhf.rewards import load_from_file
from rayrlhf.rollout import Sample, response_budget

# Seeds of a trajectory's later turns: turn t samples from seed + t * TURN_SEED_STRIDE, so no turn
# repeats another's random stream, and turn 0 draws what a single-turn rollout would.
TURN_SEED_STRIDE = 1 << 20


# The built-in tool-calling environment (rollout.env=tools).

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_calls(text: str) -> list[str]:
    """The bodies of the Hermes/Qwen-style tool calls `<tool_call>{"name": ..., "arguments": ...}
    </tool_call>` in a model turn."""
    return TOOL_CALL.findall(text)


class ToolEnv:
    """Calls the tools a turn asks for and answers with their results, as role "tool" messages (a
    templateless model sees `<tool_response>result</tool_response>`); a turn without a tool call
    ends the trajectory (reward 0: the configured reward sources judge the answer). A call that
    is not valid JSON, names an unknown tool, raises or runs past tool_timeout_s is answered with
    an error message, so the model can see it; it is counted in metrics["tool_errors"]."""

    tools: dict[str, Callable] = {}
    timeout_s: float = 10.0

    def __init__(self, prompt, **fields):
        self.metrics = {"tool_calls": 0.0, "tool_errors": 0.0}

    def step(self, response: str):
        calls = tool_calls(response)
        if not calls:
            return None, 0.0, True
        results = [self._call(body) for body in calls]
        return {"role": "tool", "content": "\n".join(results)}, 0.0, False

    def _call(self, body: str) -> str:
        self.metrics["tool_calls"] += 1
        try:
            call = json.loads(body)
            name, arguments = call["name"], call.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if name not in self.tools:
                raise ValueError(f"unknown tool {name!r} (tools: {', '.join(self.tools)})")
            result = _call_with_timeout(self.tools[name], arguments, self.timeout_s)
            return result if isinstance(result, str) else json.dumps(result)
        except Exception as err:  # noqa: BLE001 - the model's call or the tool failed: tell the model
            self.metrics["tool_errors"] += 1
            return f"error: {type(err).__name__}: {err}"


def _call_with_timeout(function: Callable, arguments: dict, timeout_s: float):
    """function(**arguments) in a thread of its own, given up after timeout_s (the thread is left
    to finish: Python cannot kill it)."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function(**arguments)
        except Exception as err:  # noqa: BLE001 - re-raised in the caller
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"the tool ran past rollout.tool_timeout_s={timeout_s}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
              ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """The value of an arithmetic expression: numbers, + - * / // % ** and parentheses."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    result = value(ast.parse(str(expression), mode="eval").body)
    return str(int(result) if isinstance(result, float) and result.is_integer() else result)


# rollout.tools by name: built-in tool sets.
BUILTIN_TOOLS = {"calculator": {"calculator": calculator}}


def load_tools(spec: str) -> dict[str, Callable]:
    """A built-in tool set, or the public functions defined in a Python file, by name."""
    if spec in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[spec]
    path = spec
    module = load_from_file("rollout.tools", path, None, EnvironmentFailure)
    return {name: obj for name, obj in vars(module).items()
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("_")}


def environment_class(rollout_cfg) -> type:
    """The class rollout.env names: the built-in `tools`, or path/to/file.py:ClassName."""
    spec = rollout_cfg.env
    if spec == "tools":
        if not rollout_cfg.tools:
            raise EnvironmentFailure("rollout.env=tools needs rollout.tools: a Python file whose functions "
                                     "are the tools")
        tools = load_tools(rollout_cfg.tools)
        if not tools:
            raise EnvironmentFailure(f"rollout.tools: {rollout_cfg.tools} defines no public function")
        return type("ToolEnv", (ToolEnv,), {"tools": tools, "timeout_s": rollout_cfg.tool_timeout_s})
    path, _, name = spec.partition(":")
    if not name:
        raise EnvironmentFailure(f"rollout.env '{spec}': not the built-in `tools`; name a class as "
                                 "path/to/file.py:ClassName")
    cls = getattr(load_from_file("rollout.env", path, spec, EnvironmentFailure), name, None)
    if not inspect.isclass(cls) or not callable(getattr(cls, "step", None)):
        raise EnvironmentFailure(f"rollout.env '{spec}': {path} has no class '{name}' with a step method")
    return cls


# Observations as tokens.

class ObservationEncoder:
    """The tokens appended after a model turn for an observation. Prompts that went through the
    chat template get the observation as the template's next message plus the opening of the
    assistant's reply, exactly as the template writes them after the model's turn (a turn cut
    before the end-of-turn token gets that token first); a tool message the template rejects
    (some want a call id) goes as a user turn <tool_response>...</tool_response>, as Hermes has it.
    Templateless prompts get the text as it is (a tool message as <tool_response>...</tool_response>)."""

    MARK = "RAYRLHF_TURN_MARK"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_text = tokenizer.decode([eos]) if eos is not None else None
        self.history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": self.MARK}]
        self.before = None  # the history as the template writes it, once one is needed

    def encode(self, observation, chat: bool, ended_with_eos: bool) -> list[int]:
        message = observation if isinstance(observation, dict) else \
            {"role": "user", "content": str(observation)}
        if not chat:
            text = str(message["content"])
            if message.get("role") == "tool":
                text = f"<tool_response>{text}</tool_response>"
        else:
            text = self._chat_continuation(message, ended_with_eos)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _chat_continuation(self, message: dict, ended_with_eos: bool) -> str:
        if self.before is None:
            self.before = self.tokenizer.apply_chat_template(self.history, tokenize=False)
        before = self.before
        try:
            after = self.tokenizer.apply_chat_template(self.history + [message], tokenize=False,
                                                       add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - the template rejects the message
            if message.get("role") == "tool":  # templates that want call ids: Hermes's user turn
                return self._chat_continuation(
                    {"role": "user", "content": f"<tool_response>{message['content']}</tool_response>"},
                    ended_with_eos)
            raise EnvironmentFailure(f"the chat template cannot render an observation with role "
                                     f"{message.get('role')!r}: {type(err).__name__}: {err}") from None
        if not after.startswith(before) or self.MARK not in before:
            raise EnvironmentFailure("the chat template rewrites earlier turns when a message is added; "
                                     "observations cannot be appended token by token")
        closing = before[before.rindex(self.MARK) + len(self.MARK):]
        if ended_with_eos and self.eos_text and closing.startswith(self.eos_text):
            closing = closing[len(self.eos_text):]
        return closing + after[len(before):]


# The trajectory loop.

@dataclass
class Turn:
    """One model turn as the engine sampled it."""
    token_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended by EOS or a stop string, not by the token limit
    text: str


@dataclass
class Trajectory:
    sample_index: int  # the prompt's k-th sample
    prompt: int  # the prompt's place in the engine's batch
    seed: int
    prompt_ids: list[int]
    chat: bool
    env: object = None
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    action_mask: list[int] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    env_seconds: float = 0.0
    last_turn: Turn | None = None
    done: bool = False  # the environment said so
    over: bool = False  # done, cut by max_turns or the token budget, or failed
    error: str | None = None

    def sample(self, tokenizer) -> Sample:
        metrics = {"turns": float(self.turns), "env_seconds": self.env_seconds}
        metrics |= {k: float(v) for k, v in getattr(self.env, "metrics", {}).items()}
        return Sample(self.response_ids, self.logprobs, self.done,
                      tokenizer.decode(self.response_ids, skip_special_tokens=True),
                      self.action_mask, self.reward, metrics, self.error)


class EngineTurns:
    """What the loop needs of an engine: requests of one turn each, batched continuously."""

    def submit(self, token_ids: list[int], max_tokens: int, seed: int, greedy: bool) -> str:
        raise NotImplementedError

    def step(self) -> list[tuple[str, Turn]]:
        """Advances the engine by one step; the turns that finished in it, by request id."""
        raise NotImplementedError

    def busy(self) -> bool:
        raise NotImplementedError

    def abort(self, request_ids: list[str]) -> None:
        """Drops requests not finished (the run stopped)."""
        raise NotImplementedError


class EpisodeRunner:
    """Runs every trajectory of a batch to its end: each model turn is its own engine request, so a
    long trajectory does not hold the others, and environment steps run in threads (up to
    rollout.env_concurrency at once) while the engine goes on with the others' turns."""

    def __init__(self, rollout_cfg, env_class: type, tokenizer, eos_token_id: int | None):
        self.cfg, self.env_class, self.tokenizer = rollout_cfg, env_class, tokenizer
        self.encoder = ObservationEncoder(tokenizer)
        self.eos_token_id = eos_token_id
        self.budget = response_budget(rollout_cfg)

    def run(self, engine: EngineTurns, prompt_ids: list[list[int]], rows: list[dict], seeds: list[int] | None,
            greedy: bool) -> list[list[Sample]]:
        n = 1 if greedy else self.cfg.n
        trajectories = [Trajectory(k, i, 0 if seeds is None else seeds[i] + k, ids, rows[i]["chat"])
                        for i, ids in enumerate(prompt_ids) for k in range(n)]
        self.rows = rows
        requests: dict[str, Trajectory] = {}
        waiting: deque[Trajectory] = deque()  # turns whose environment step has not started
        running: dict[futures.Future, tuple[Trajectory, float]] = {}
        pool = futures.ThreadPoolExecutor(self.cfg.env_concurrency, thread_name_prefix="rayrlhf-env")
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True, name="rayrlhf-env-async").start()
        try:
            for t in trajectories:
                self._start(t, rows[t.prompt])
                if not t.over:
                    requests[self._submit(engine, t, greedy)] = t
            while not all(t.over for t in trajectories):
                if engine.busy():
                    for request_id, turn in engine.step():
                        t = requests.pop(request_id)
                        self._add_turn(t, turn)
                        waiting.append(t)
                while waiting and len(running) < self.cfg.env_concurrency:
                    t = waiting.popleft()
                    running[pool.submit(_step, t.env, t.last_turn.text, loop)] = (t, time.monotonic())
                for t in self._finished_steps(running, block=not engine.busy()):
                    if not t.over:
                        requests[self._submit(engine, t, greedy)] = t
        finally:
            if requests:  # stopped by a failure: the engine must not go on with them
                engine.abort(list(requests))
            pool.shutdown(wait=False, cancel_futures=True)
            loop.call_soon_threadsafe(loop.stop)
        samples = [t.sample(self.tokenizer) for t in trajectories]
        return [samples[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _start(self, t: Trajectory, row: dict) -> None:
        try:
            t.env = self.env_class(row["prompt"], **row["fields"])
        except Exception as err:  # noqa: BLE001 - the user's environment failed
            self._fail(t, f"{type(err).__name__}: {err}", "construction")

    def _submit(self, engine: EngineTurns, t: Trajectory, greedy: bool) -> str:
        max_tokens = min(self.cfg.max_new_tokens, self.budget - len(t.response_ids))
        seed = t.seed + t.turns * TURN_SEED_STRIDE
        return engine.submit(t.prompt_ids + t.response_ids, max_tokens, seed, greedy)

    def _add_turn(self, t: Trajectory, turn: Turn) -> None:
        t.response_ids += turn.token_ids
        t.logprobs += turn.logprobs
        t.action_mask += [1] * len(turn.token_ids)
        t.turns += 1
        t.last_turn = turn

    def _finished_steps(self, running: dict, block: bool) -> list[Trajectory]:
        """The trajectories whose environment step ended (applied to them); waits for one when
        `block` (the engine has nothing to do). A step past rollout.env_timeout_s fails."""
        timeout = self.cfg.env_timeout_s
        if not running:
            return []
        now = time.monotonic()
        wait_s = max(0.0, min(start for _, start in running.values()) + timeout - now) if block else 0.0
        done, _ = futures.wait(running, timeout=wait_s, return_when=futures.FIRST_COMPLETED)
        out = []
        for future in done:
            t, start = running.pop(future)
            t.env_seconds += time.monotonic() - start
            try:
                observation, reward, finished = future.result()
                self._apply_step(t, observation, float(reward), bool(finished))
            except Exception as err:  # noqa: BLE001 - the user's environment failed
                self._fail(t, f"{type(err).__name__}: {err}", f"step {t.turns}")
            out.append(t)
        now = time.monotonic()
        for future, (t, start) in list(running.items()):
            if now - start > timeout:
                running.pop(future)
                t.env_seconds += now - start
                self._fail(t, f"the step ran past rollout.env_timeout_s={timeout}", f"step {t.turns}")
                out.append(t)
        return out

    def _apply_step(self, t: Trajectory, observation, reward: float, finished: bool) -> None:
        t.reward += reward
        if finished:
            t.done = t.over = True
            return
        room = self.budget - len(t.response_ids)
        if t.turns >= self.cfg.max_turns or room <= 0:
            t.over = True  # cut: not done
            return
        last = t.last_turn
        ended_with_eos = bool(last.token_ids) and last.token_ids[-1] == self.eos_token_id
        tokens = [] if observation is None else self.encoder.encode(observation, t.chat, ended_with_eos)
        if len(tokens) >= room:  # no room left for the model to answer it
            t.over = True
            return
        t.response_ids += tokens
        t.logprobs += [0.0] * len(tokens)
        t.action_mask += [0] * len(tokens)

    def _fail(self, t: Trajectory, why: str, where: str) -> None:
        t.error, t.over = f"{where}: {why}", True
        if self.cfg.env_errors == "error":
            row = self.rows[t.prompt]
            where = f"dataset row {row['row']}, " if row.get("row", -1) >= 0 else ""
            raise EnvironmentFailure(
                f"rollout.env '{self.cfg.env}' failed in its {t.error} (sample {t.sample_index} of the "
                f"prompt {str(row['prompt'])[:80]!r}, {where}after {t.turns} turn(s)); "
                "rollout.env_errors=skip drops such trajectories and counts them")


def _step(env, response: str, loop: asyncio.AbstractEventLoop):
    """env.step(response), awaited on the runner's event loop when it is a coroutine."""
    result = env.step(response)
    if inspect.isawaitable(result):
        result = asyncio.run_coroutine_threadsafe(_awaited(result), loop).result()
    observation, reward, done = result
    return observation, reward, done


async def _awaited(awaitable):
    return await awaitable
