"""Built-in synthetic tasks: prompts, a correct answer for each, and corruptions of it.

They give the built-in default (PPO alone) its prompts, and the built-in pipeline its SFT
demonstrations (prompt, answer) and preference pairs (answer chosen over a corruption). Whether
an answer is right is checkable by a rule (rayrlhf.rewards), which is what makes them useful
for measuring what each stage learnt.

`alphabet`: a prompt is a run of 3 to 6 consecutive letters and "=" ("cdef="); the answer
continues the alphabet for ANSWER_LEN letters ("ghijklmn"), wrapping z -> a. The "=" marks where
the prompt ends, without which a model could not tell when it has written ANSWER_LEN letters.

`calculator`: a prompt is a product of two 2-digit numbers and "=" ("17*23="); the answer is its
value ("391"), which a tiny model cannot compute but the `calculator` tool (rollout.env=tools,
rollout.tools=calculator) can. A third of the SFT demonstrations call the tool in the Hermes/Qwen
format, read its response and repeat its value; the others answer at once (rightly, but a model
cannot learn multiplication from them), so the SFT policy mostly answers at once, wrongly, and
reinforcement learning has something to find out: that calling the tool gets answers right.
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


def calculator_prompts(count: int, seed: int, held_out: bool = False) -> list[str]:
    """Products of two numbers of 10..99; a fifth of the pairs is kept for evaluation."""
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < count:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if ((a + 2 * b) % 5 == 0) == held_out:
            prompts.append(f"{a}*{b}{SEPARATOR}")
    return prompts


def calculator_answer(prompt: str) -> str:
    a, b = prompt.removesuffix(SEPARATOR).split("*")
    return str(int(a) * int(b))


CALCULATOR_CALL = '<tool_call>{{"name": "calculator", "arguments": {{"expression": "{}"}}}}</tool_call>'


def calculator_demonstration(prompt: str, rng: random.Random) -> str | list[dict]:
    """A third of the time a tool-using answer, as the turns of a multi-turn demonstration (the
    call, the tool's result, the value; SFT trains on the assistant's turns only), else the value
    at once."""
    answer = calculator_answer(prompt)
    if rng.random() >= 1 / 3:
        return answer
    return [{"role": "assistant", "content": CALCULATOR_CALL.format(prompt.removesuffix(SEPARATOR))},
            {"role": "tool", "content": answer}, {"role": "assistant", "content": answer}]


def calculator_corrupt(answer: str, rng: random.Random) -> str:
    i = rng.randrange(len(answer))
    return answer[:i] + rng.choice([d for d in string.digits if d != answer[i]]) + answer[i + 1:]


@dataclass(frozen=True)
class Task:
    # (count, seed, held_out) -> prompts; held-out prompts never occur in training data.
    prompts: Callable[[int, int, bool], list[str]]
    answer: Callable[[str], str]
    corrupt: Callable[[str, random.Random], str]
    # An SFT demonstration of a prompt (a string, or the turns of a multi-turn one); None
    # demonstrates the answer.
    demonstration: Callable[[str, random.Random], str | list[dict]] | None = None


TASKS: dict[str, Task] = {
    "alphabet": Task(alphabet_prompts, alphabet_answer, alphabet_corrupt),
    "calculator": Task(calculator_prompts, calculator_answer, calculator_corrupt, calculator_demonstration),
}


def demonstrations(task: str, count: int, seed: int, held_out: bool = False) -> list[dict]:
    """SFT rows {prompt, response} with the correct answers."""
    t, rng = TASKS[task], random.Random(seed + 2)
    demonstrate = t.demonstration or (lambda prompt, _: t.answer(prompt))
    return [{"prompt": p, "response": demonstrate(p, rng)} for p in t.prompts(count, seed, held_out)]


def preference_pairs(task: str, count: int, seed: int, held_out: bool = False) -> list[dict]:
    """Reward-model rows {prompt, chosen, rejected}: the answer over a corruption of it."""
    t, rng = TASKS[task], random.Random(seed + 1)
    return [{"prompt": p, "chosen": t.answer(p), "rejected": t.corrupt(t.answer(p), rng)}
            for p in t.prompts(count, seed, held_out)]
