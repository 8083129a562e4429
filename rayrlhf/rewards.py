"""Reward functions: the built-in rules and the loader for a user's own file.

A reward function has the contract `reward(prompts: list[str], responses: list[str], **fields)
-> list[float]`, where `fields` holds the dataset's other columns for the same rows. It may also
return a dict {"reward": [...], "<metric>": [...]}; the other lists are logged as metrics.

The default task, `alphabet`: a prompt is a run of consecutive letters ("cdef"); the response
should go on with the alphabet ("ghijklmn", wrapping z -> a). The score is the number of response
characters that follow their predecessor (the prompt's last letter for the first one), divided by
ALPHABET_TARGET_LEN, so in [0, 1]. A random tiny model scores about 0.02; a policy that has learnt
the successor map scores close to 1.
"""

from __future__ import annotations

import importlib.util
import random
import string
from collections.abc import Callable
from pathlib import Path

from rayrlhf.errors import RewardError

ALPHABET_TARGET_LEN = 8
LETTERS = string.ascii_lowercase


def _successor(ch: str) -> str:
    return LETTERS[(LETTERS.index(ch) + 1) % 26]


def alphabet_reward(prompt: str, response: str) -> float:
    previous = prompt[-1] if prompt else ""
    correct = 0
    for ch in response[:ALPHABET_TARGET_LEN]:
        if previous in LETTERS and ch == _successor(previous):
            correct += 1
        previous = ch
    return correct / ALPHABET_TARGET_LEN


def alphabet_prompts(count: int, seed: int) -> list[str]:
    """Runs of 3 to 6 consecutive letters starting anywhere in the alphabet."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        start, length = rng.randrange(26), rng.randint(3, 6)
        prompts.append("".join(LETTERS[(start + i) % 26] for i in range(length)))
    return prompts


def alphabet(prompts: list[str], responses: list[str], **fields) -> list[float]:
    return [alphabet_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


# Built-in reward functions, and the prompt sets that go with them when no dataset is given.
BUILTIN: dict[str, Callable[..., list[float]]] = {"alphabet": alphabet}
SYNTHETIC_PROMPTS: dict[str, Callable[[int, int], list[str]]] = {"alphabet": alphabet_prompts}


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
