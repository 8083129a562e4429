"""Built-in rule-based rewards: pure functions of (prompt, response) text, scored in the reward actors.

The default task, `alphabet`: a prompt is a run of consecutive letters ("cdef"); the response
should go on with the alphabet ("ghijklmn", wrapping z -> a). The score is the number of response
characters that follow their predecessor (the prompt's last letter for the first one), divided by
ALPHABET_TARGET_LEN, so in [0, 1]. A random tiny model scores about 0.02; a policy that has learnt
the successor map scores close to 1.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

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


RULES: dict[str, Callable[[str, str], float]] = {"alphabet": alphabet_reward}
SYNTHETIC_PROMPTS: dict[str, Callable[[int, int], list[str]]] = {"alphabet": alphabet_prompts}
