"""Reward functions: the built-in rules and the loader for a user's own file.

A reward function has the contract `reward(prompts: list[str], responses: list[str], **fields)
-> list[float]`, where `fields` holds the dataset's other columns for the same rows. It may also
return a dict {"reward": [...], "<metric>": [...]}; the other lists are logged as metrics.

For the built-in task `alphabet` (rayrlhf.tasks): `alphabet` scores the number of response
characters that follow their predecessor (the prompt's last letter for the first one), divided by
ALPHABET_TARGET_LEN, so in [0, 1]; a random tiny model scores about 0.02, a policy that has learnt
the successor map close to 1. `alphabet_exact` is the task's accuracy: exactly the right answer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from rayrlhf.errors import RewardError
from rayrlhf.tasks import ANSWER_LEN, LETTERS, alphabet_answer, last_letter, successor

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


BUILTIN: dict[str, Callable[..., list[float]]] = {"alphabet": alphabet, "alphabet_exact": alphabet_exact}


def load_reward_function(spec: str) -> Callable[..., list[float]]:
    """A built-in name, or `path/to/file.py` (function `reward`) or `path/to/file.py:name`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path, _, name = spec.partition(":")
    name = name or "reward"
    if not path.endswith(".py") or not Path(path).is_file():
        raise RewardError(f"reward.function '{spec}': no built-in of that name ({', '.join(BUILTIN)}) "
                          f"and no Python file {path}")
    module_spec = importlib.util.spec_from_file_location(f"rayrlhf_user_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's module failed to import
        raise RewardError(f"reward.function '{spec}': importing {path} failed: "
                          f"{type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"reward.function '{spec}': {path} has no function '{name}'")
    return function
