"""Reward functions: the built-in rules and the loader for a user's own file.

A reward function has the contract `reward(prompts: list, responses: list[str], **fields)
-> list[float]`, where each prompt is as the dataset gives it (a string, or a conversation: a
list of {"role", "content"} messages) and `fields` holds the dataset's other columns for the same
rows. It may also return a dict {"reward": [...], "<metric>": [...]}; the other lists are logged
as metrics (reward/<metric>).

For the built-in task `alphabet` (rayrlhf.tasks): `alphabet` scores the number of response
characters that follow their predecessor (the prompt's last letter for the first one), divided by
ALPHABET_TARGET_LEN, so in [0, 1]; a random tiny model scores about 0.02, a policy that has learnt
the successor map close to 1. `alphabet_exact` is the task's accuracy: exactly the right answer.

For the built-in task `calculator`: `calculator_exact` is 1.0 when what follows the last tool
response is exactly the product (it logs used_tool: whether the response called a tool).

For verifiable tasks (math datasets such as GSM8K or MATH):
- `math`: 1.0 when the response's final answer equals the reference answer, else 0.0. The final
  answer is the last `\boxed{...}`, else what follows the last `####` (GSM8K), else the last
  number. The reference is the row's `answer`, `solution` or `ground_truth` column (the first
  present), or verl's `reward_model: {"ground_truth": ...}`; from it the last `\boxed{}` or
  `####` answer is taken, else the whole text. Equality is math-verify's: the same value in any
  form (1/2, 0.5, \frac12; 1,000 and 1000; x(x+2) and x^2+2x), strings compared as they are
  where math-verify parses nothing. Logs math_answered: the share of responses with an answer.
- `format`: 1.0 when the response gives its answer in a non-empty `\boxed{...}` and, if it opens
  a `<think>` block, closes it before that answer; else 0.0. Weigh it below `math` in
  reward.functions to teach the form early without paying for it later.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from collections.abc import Callable
from pathlib import Path

from rayrlhf.errors import RayRLHFError, RewardError
from rayrlhf.tasks import ANSWER_LEN, LETTERS, alphabet_answer, calculator_answer, last_letter, successor

ALPHABET_TARGET_LEN = ANSWER_LEN


def alphabet_reward(prompt: str, response: str) -> float:
    previous = last_letter(prompt)
    correct = 0
    for ch in response[:ALPHABET_TARGET_LEN]:
        if previous in LETTERS and ch == successor(previous):
            correct += 1
        previous = ch
    return correct / ALPHABET_TARGET_LEN


def alphabet(prompts: list[str], responses: list[str], **fields) -> list[float]:
    return [alphabet_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


def alphabet_exact(prompts: list[str], responses: list[str], **fields) -> list[float]:
    """Task accuracy: 1 for exactly the right continuation (and nothing after it), else 0."""
    return [float(r.strip() == alphabet_answer(p)) for p, r in zip(prompts, responses, strict=True)]


def last_boxed(text: str) -> tuple[int, str] | None:
    """(where it starts, its content) of the last \\boxed{...} (or \\fbox) with balanced braces."""
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        depth = 1
        for end in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return match.start(), text[match.end():end].strip()
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_answer(text: str, whole_text_fallback: bool = False) -> str | None:
    """The last \\boxed{} content, else what follows the last '####', else the last number (or,
    for a reference answer, the whole text); None when there is none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed[1] or None
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    if whole_text_fallback:
        return text.strip() or None
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(".,") if numbers else None


_REFERENCE_COLUMNS = ("answer", "solution", "ground_truth")


def _reference(row: int, fields: dict) -> str:
    for column in _REFERENCE_COLUMNS:
        if fields.get(column) is not None:
            return str(fields[column][row])
    nested = fields.get("reward_model")
    if nested is not None and isinstance(nested[row], dict) and nested[row].get("ground_truth") is not None:
        return str(nested[row]["ground_truth"])
    raise RewardError(f"the math reward needs the reference answer in a column named "
                      f"{', '.join(_REFERENCE_COLUMNS)} or reward_model.ground_truth; the dataset has "
                      f"{', '.join(fields) or 'no other columns'}")


def answers_match(reference: str, answer: str) -> bool:
    """Whether two final answers are the same value, by math-verify (strings where it parses nothing)."""
    from math_verify import parse, verify

    # math-verify bounds its sympy work with signal.alarm, which only the main thread may use.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    strip = lambda s: s.replace("\\$", "").replace("$", "").strip()  # noqa: E731 - currency signs
    gold = parse(f"${strip(reference)}$", parsing_timeout=timeout)
    pred = parse(f"${strip(answer)}$", parsing_timeout=timeout)
    if not gold or not pred:
        return " ".join(strip(reference).split()) == " ".join(strip(answer).split())
    return bool(verify(gold, pred, timeout_seconds=timeout))


def math_answer(prompts: list, responses: list[str], **fields) -> dict[str, list[float]]:
    answers = [final_answer(r) for r in responses]
    rewards = [float(a is not None and answers_match(final_answer(_reference(i, fields), True) or "", a))
               for i, a in enumerate(answers)]
    return {"reward": rewards, "math_answered": [float(a is not None) for a in answers]}


def format_reward(response: str) -> float:
    boxed = last_boxed(response)
    if boxed is None or not boxed[1]:
        return 0.0
    if "<think>" in response:
        closed = response.find("</think>", response.find("<think>"))
        return float(0 <= closed < boxed[0])
    return 1.0


def answer_format(prompts: list, responses: list[str], **fields) -> list[float]:
    return [format_reward(r) for r in responses]


def calculator_exact(prompts: list[str], responses: list[str], **fields) -> dict[str, list[float]]:
    """The calculator task's accuracy: 1 when what follows the last tool response (the whole
    response without one) is exactly the product; logs used_tool, the share that called a tool."""
    answers = [r.rsplit("</tool_response>", 1)[-1].strip() for r in responses]
    return {"reward": [float(a == calculator_answer(p)) for p, a in zip(prompts, answers, strict=True)],
            "used_tool": [float("<tool_call>" in r) for r in responses]}


BUILTIN: dict[str, Callable[..., list[float]]] = {"alphabet": alphabet, "alphabet_exact": alphabet_exact,
                                                  "math": math_answer, "format": answer_format,
                                                  "calculator_exact": calculator_exact}


def load_reward_function(spec: str) -> Callable[..., list[float]]:
    """A built-in name, or `path/to/file.py` (function `reward`) or `path/to/file.py:name`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path, _, name = spec.partition(":")
    name = name or "reward"
    if not path.endswith(".py") or not Path(path).is_file():
        raise RewardError(f"reward.function '{spec}': no built-in of that name ({', '.join(BUILTIN)}) "
                          f"and no Python file {path}")
    function = getattr(load_from_file("reward.function", path, spec), name, None)
    if not callable(function):
        raise RewardError(f"reward.function '{spec}': {path} has no function '{name}'")
    return function


def load_from_file(key: str, path: str, spec: str | None, error: type[RayRLHFError] = RewardError):
    """The user's Python file `path` (named by config key `key` as `spec`), imported as a module."""
    where = f"{key} '{spec or path}'"
    if not path.endswith(".py") or not Path(path).is_file():
        raise error(f"{where}: no Python file {path}")
    module_spec = importlib.util.spec_from_file_location(f"rayrlhf_user_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's module failed to import
        raise error(f"{where}: importing {path} failed: {type(err).__name__}: {err}") from None
    return module
