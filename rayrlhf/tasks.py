"""Built-in synthetic tasks: prompts, a correct answer for each, and corruptions of it.

They give the built-in default (PPO alone) its prompts, and the built-in pipeline its SFT
demonstrations (prompt, answer) and preference pairs (answer chosen over a corruption). Whether
an answer is right is checkable by a rule (rayrlhf.rewards), which is what makes them useful
for measuring what each stage learnt.

`alphabet`: a prompt is a run of 3 to 6 consecutive letters and "=" ("cdef="); the answer
continues the alphabet for ANSWER_LEN letters ("ghijklmn"), wrapping z -> a. The "=" marks where
the prompt ends, without which a model could not tell when it has written ANSWER_LEN letters.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
ANSWER_LEN = 8
SEPARATOR = "="


def successor(ch: str) -> str:
    return LETTERS[(LETTERS.index(ch) + 1) % 26]


def alphabet_prompts(count: int, seed: int, held_out: bool = False) -> list[str]:
    """Training prompts, or (held_out) prompts that never appear in training: a fifth of the
    (start, length) combinations is kept for evaluation."""
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < count:
        start, length = rng.randrange(26), rng.randint(3, 6)
        if ((start + 3 * length) % 5 == 0) == held_out:
            prompts.append("".join(LETTERS[(start + i) % 26] for i in range(length)) + SEPARATOR)
    return prompts


def last_letter(prompt: str) -> str:
    return prompt.removesuffix(SEPARATOR)[-1:]


def alphabet_answer(prompt: str) -> str:
    out, previous = [], last_letter(prompt)
    for _ in range(ANSWER_LEN):
        previous = successor(previous)
        out.append(previous)
    return "".join(out)


def alphabet_corrupt(answer: str, rng: random.Random) -> str:
    """A near miss: one wrong letter, two letters swapped, stopping early, running on, or a
    right-looking run that starts a letter or two off."""
    kind = rng.randrange(5)
    if kind == 0:
        i = rng.randrange(len(answer))
        wrong = rng.choice([c for c in LETTERS if c != answer[i]])
        return answer[:i] + wrong + answer[i + 1:]
    if kind == 1:
        i = rng.randrange(len(answer) - 1)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
    if kind == 2:
        return answer[:rng.randrange(1, len(answer))]
    if kind == 3:
        return answer + "".join(successor(answer[-1]) if j == 0 else rng.choice(LETTERS)
                                for j in range(rng.randint(1, 3)))
    shift = rng.choice([-2, -1, 1, 2])
    return "".join(LETTERS[(LETTERS.index(c) + shift) % 26] for c in answer)


@dataclass(frozen=True)
class Task:
    # (count, seed, held_out) -> prompts; held-out prompts never occur in training data.
    prompts: Callable[[int, int, bool], list[str]]
    answer: Callable[[str], str]
    corrupt: Callable[[str, random.Random], str]


TASKS: dict[str, Task] = {"alphabet": Task(alphabet_prompts, alphabet_answer, alphabet_corrupt)}


def demonstrations(task: str, count: int, seed: int, held_out: bool = False) -> list[dict]:
    """SFT rows {prompt, response} with the correct answers."""
    t = TASKS[task]
    return [{"prompt": p, "response": t.answer(p)} for p in t.prompts(count, seed, held_out)]


def preference_pairs(task: str, count: int, seed: int, held_out: bool = False) -> list[dict]:
    """Reward-model rows {prompt, chosen, rejected}: the answer over a corruption of it."""
    t, rng = TASKS[task], random.Random(seed + 1)
    return [{"prompt": p, "chosen": t.answer(p), "rejected": t.corrupt(t.answer(p), rng)}
            for p in t.prompts(count, seed, held_out)]
