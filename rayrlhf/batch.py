"""The token layout every role shares: prompts left-padded to P, responses right-padded to N.

Response token j sits at column P + j of `sequences` for every row, so log-probs, values and
masks line up without per-row offsets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    prompt_len: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.tensors[key] = value

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: torch.Tensor | slice) -> Batch:
        return Batch(self.prompt_len, {k: v[index] for k, v in self.tensors.items()})

    def chunks(self, count: int) -> list[Batch]:
        """`count` consecutive parts whose sizes differ by at most one."""
        bounds = [round(i * len(self) / count) for i in range(count + 1)]
        return [self.select(slice(bounds[i], bounds[i + 1])) for i in range(count)]

    def minibatches(self, size: int) -> list[Batch]:
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]


def build_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> Batch:
    """Left-pad prompts, right-pad responses, and record each response's length."""
    prompt_len = max(len(p) for p in prompt_ids)
    response_len = max(1, max(len(r) for r in response_ids))
    rows, attention = [], []
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        left = [pad_id] * (prompt_len - len(prompt))
        right = [pad_id] * (response_len - len(response))
        rows.append(left + list(prompt) + list(response) + right)
        attention.append([0] * len(left) + [1] * (len(prompt) + len(response)) + [0] * len(right))
    return Batch(prompt_len, {
        "sequences": torch.tensor(rows, dtype=torch.long),
        "attention_mask": torch.tensor(attention, dtype=torch.long),
        "response_lengths": torch.tensor([len(r) for r in response_ids], dtype=torch.long),
    })


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift them (vLLM sees no pad)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)

