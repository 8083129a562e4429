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
import itertools
import json
import operator
import queue
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
    if not path.endswith(".py"):
        raise EnvironmentFailure(f"rollout.tools '{spec}': no built-in tool set of that name "
                                 f"({', '.join(BUILTIN_TOOLS)}) and not a Python file")
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
    assistant's reply, exactly as the template writes them after an assistant turn (a turn cut
    before the end-of-turn token gets that token first); a tool message the template rejects
    (some want a call id) goes as a user turn <tool_response>...</tool_response>, as Hermes has it.
    Templateless prompts get the observation's raw text (raw_text)."""

    MARK = "RAYRLHF_TURN_MARK"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_text = tokenizer.decode([eos]) if eos is not None else None

    @staticmethod
    def raw_text(observation) -> str:
        """An observation as text: its content, a tool message's as <tool_response>...</tool_response>."""
        if not isinstance(observation, dict):
            return str(observation)
        text = str(observation["content"])
        return f"<tool_response>{text}</tool_response>" if observation.get("role") == "tool" else text

    def encode(self, observation, chat: bool, ended_with_eos: bool) -> list[int]:
        if not chat:
            text = self.raw_text(observation)
        else:
            message = observation if isinstance(observation, dict) else \
                {"role": "user", "content": str(observation)}
            text = self._chat_continuation(message, ended_with_eos)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _chat_continuation(self, message: dict, ended_with_eos: bool) -> str:
        """What the template writes after an assistant turn's content: the turn's closing, the
        message, the next turn's opening. Templates that render earlier turns differently once a
        message follows (Qwen3 drops the empty think block of an assistant turn before the last
        user turn) still end the assistant's content where the model ended it."""
        history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": self.MARK}, message]
        try:
            rendered = self.tokenizer.apply_chat_template(history, tokenize=False,
                                                          add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - the template rejects the message
            if message.get("role") == "tool":  # templates that want call ids: Hermes's user turn
                as_user = {"role": "user", "content": self.raw_text(message)}
                return self._chat_continuation(as_user, ended_with_eos)
            raise EnvironmentFailure(f"the chat template cannot render an observation with role "
                                     f"{message.get('role')!r}: {type(err).__name__}: {err}") from None
        if self.MARK not in rendered:
            raise EnvironmentFailure("the chat template does not write an assistant turn's content as it "
                                     "is; observations cannot be appended to the model's tokens")
        continuation = rendered[rendered.rindex(self.MARK) + len(self.MARK):]
        if str(message["content"]) not in continuation:
            raise EnvironmentFailure(f"the chat template leaves out an observation with role "
                                     f"{message['role']!r}")
        if ended_with_eos and self.eos_text and continuation.startswith(self.eos_text):
            continuation = continuation[len(self.eos_text):]
        return continuation


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
    seed: int | None
    prompt_ids: list[int]
    chat: bool
    env: object = None
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    action_mask: list[int] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    env_seconds: float = 0.0
    # The model's turns as the engine decoded them, and the observations' raw text between them
    # (what reward functions read, whatever the chat template).
    text: str = ""
    last_turn: Turn | None = None
    done: bool = False  # the environment said so
    over: bool = False  # done, cut by max_turns or the token budget, or failed
    error: str | None = None

    def sample(self) -> Sample:
        metrics = {"turns": float(self.turns), "env_seconds": self.env_seconds}
        metrics |= {k: float(v) for k, v in getattr(self.env, "metrics", {}).items()}
        # Finished: the environment ended it after a turn that itself ended (not at max_new_tokens).
        finished = self.done and self.last_turn is not None and self.last_turn.finished
        return Sample(self.response_ids, self.logprobs, finished, self.text, self.action_mask, self.reward,
                      metrics, self.error)


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
    long trajectory does not hold the others, and environment steps run in threads of their own
    (up to rollout.env_concurrency at once) while the engine goes on with the others' turns."""

    def __init__(self, rollout_cfg, env_class: type, tokenizer):
        self.cfg, self.env_class, self.tokenizer = rollout_cfg, env_class, tokenizer
        self.encoder = ObservationEncoder(tokenizer)
        self.budget = response_budget(rollout_cfg)
        if getattr(tokenizer, "chat_template", None):  # a template that cannot take turns fails here
            for probe in ("probe", {"role": "tool", "content": "probe"}):
                self.encoder.encode(probe, chat=True, ended_with_eos=True)

    def run(self, engine: EngineTurns, prompt_ids: list[list[int]], rows: list[dict], seeds: list[int] | None,
            greedy: bool) -> list[list[Sample]]:
        n = 1 if greedy else self.cfg.n
        trajectories = [Trajectory(k, i, None if seeds is None else seeds[i] + k, ids, rows[i]["chat"])
                        for i, ids in enumerate(prompt_ids) for k in range(n)]
        self.rows = rows
        requests: dict[str, Trajectory] = {}
        waiting: deque[Trajectory] = deque()  # turns whose environment step has not started
        steps = _EnvironmentSteps(self.cfg.env_timeout_s)
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
                while waiting and steps.running() < self.cfg.env_concurrency:
                    t = waiting.popleft()
                    steps.start(t, t.env, t.last_turn.text)
                for t, result, seconds in steps.ended(block=not engine.busy()):
                    t.env_seconds += seconds
                    if isinstance(result, BaseException):
                        self._fail(t, f"{type(result).__name__}: {result}", f"step {t.turns}")
                        continue
                    observation, reward, finished = result
                    self._apply_step(t, observation, float(reward), bool(finished))
                    if not t.over:
                        requests[self._submit(engine, t, greedy)] = t
        finally:
            if requests:  # stopped by a failure: the engine must not go on with them
                engine.abort(list(requests))
            steps.close()
        samples = [t.sample() for t in trajectories]
        return [samples[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _start(self, t: Trajectory, row: dict) -> None:
        try:
            t.env = self.env_class(row["prompt"], **row["fields"])
        except Exception as err:  # noqa: BLE001 - the user's environment failed
            self._fail(t, f"{type(err).__name__}: {err}", "construction")

    def _submit(self, engine: EngineTurns, t: Trajectory, greedy: bool) -> str:
        max_tokens = min(self.cfg.max_new_tokens, self.budget - len(t.response_ids))
        seed = None if t.seed is None else t.seed + t.turns * TURN_SEED_STRIDE
        return engine.submit(t.prompt_ids + t.response_ids, max_tokens, seed, greedy)

    def _add_turn(self, t: Trajectory, turn: Turn) -> None:
        t.response_ids += turn.token_ids
        t.logprobs += turn.logprobs
        t.action_mask += [1] * len(turn.token_ids)
        t.text += turn.text
        t.turns += 1
        t.last_turn = turn

    def _apply_step(self, t: Trajectory, observation, reward: float, finished: bool) -> None:
        """The step's outcome; the observation's tokens (errors of the chat template are the run's,
        not the environment's: they stop it whatever rollout.env_errors says)."""
        t.reward += reward
        if finished:
            t.done = t.over = True
            return
        room = self.budget - len(t.response_ids)
        if t.turns >= self.cfg.max_turns or room <= 0:
            t.over = True  # cut: not done
            return
        last = t.last_turn
        ended_with_eos = bool(last.token_ids) and last.token_ids[-1] == self.tokenizer.eos_token_id
        tokens = [] if observation is None else self.encoder.encode(observation, t.chat, ended_with_eos)
        if len(tokens) >= room:  # no room left for the model to answer it
            t.over = True
            return
        t.response_ids += tokens
        t.logprobs += [0.0] * len(tokens)
        t.action_mask += [0] * len(tokens)
        t.text += "" if observation is None else ObservationEncoder.raw_text(observation)

    def _fail(self, t: Trajectory, why: str, where: str) -> None:
        t.error, t.over = f"{where}: {why}", True
        if self.cfg.env_errors == "error":
            row = self.rows[t.prompt]
            where = f"dataset row {row['row']}, " if row.get("row", -1) >= 0 else ""
            raise EnvironmentFailure(
                f"rollout.env '{self.cfg.env}' failed in its {t.error} (sample {t.sample_index} of the "
                f"prompt {str(row['prompt'])[:80]!r}, {where}after {t.turns} turn(s)); "
                "rollout.env_errors=skip drops such trajectories and counts them")


class _EnvironmentSteps:
    """Environment steps, each in a thread of its own (so one that hangs holds up no other), async
    ones on one event loop. ended() gives (trajectory, result or exception, seconds) for the steps
    that returned, raised, or ran past the time limit (a coroutine is then cancelled; a thread is
    left to finish, its result dropped)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.results: queue.Queue = queue.Queue()
        self.started: dict[int, tuple[object, float]] = {}  # step id -> (trajectory, start)
        self.coroutines: dict[int, futures.Future] = {}
        self.ids = itertools.count()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="rayrlhf-env-async").start()

    def running(self) -> int:
        return len(self.started)

    def start(self, trajectory, env, response: str) -> None:
        step_id = next(self.ids)
        self.started[step_id] = (trajectory, time.monotonic())
        threading.Thread(target=self._run, args=(step_id, env, response), daemon=True,
                         name="rayrlhf-env-step").start()

    def _run(self, step_id: int, env, response: str) -> None:
        try:
            result = env.step(response)
            if inspect.isawaitable(result):
                future = asyncio.run_coroutine_threadsafe(_awaited(result), self.loop)
                self.coroutines[step_id] = future
                result = future.result()
            observation, reward, done = result
            self.results.put((step_id, (observation, reward, done)))
        except BaseException as err:  # noqa: BLE001 - the user's environment failed (or was cancelled)
            self.results.put((step_id, err))

    def ended(self, block: bool) -> list[tuple[object, object, float]]:
        """Waits, when `block`, until a step ends or the first one's time is up."""
        if not self.started:
            return []
        items = []
        if block:
            first_deadline = min(start for _, start in self.started.values()) + self.timeout_s
            try:
                items.append(self.results.get(timeout=max(1e-3, first_deadline - time.monotonic())))
            except queue.Empty:
                pass
        while not self.results.empty():
            items.append(self.results.get_nowait())
        now, out = time.monotonic(), []
        for step_id, result in items:
            if step_id in self.started:  # not given up on already
                trajectory, start = self.started.pop(step_id)
                self.coroutines.pop(step_id, None)
                out.append((trajectory, result, now - start))
        for step_id, (trajectory, start) in list(self.started.items()):
            if now - start > self.timeout_s:
                del self.started[step_id]
                coroutine = self.coroutines.pop(step_id, None)
                if coroutine is not None:
                    coroutine.cancel()
                late = TimeoutError(f"the step ran past rollout.env_timeout_s={self.timeout_s}")
                out.append((trajectory, late, now - start))
        return out

    def close(self) -> None:
        for coroutine in list(self.coroutines.values()):
            coroutine.cancel()
        self.loop.call_soon_threadsafe(self.loop.stop)


async def _awaited(awaitable):
    return await awaitable
