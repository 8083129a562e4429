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



def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: item indices grouped so each group's lengths sum to at most
    `capacity` (an item longer than that goes alone)."""
    groups: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((g for g, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            groups.append([])
            room.append(capacity)
            slot = len(groups) - 1
        groups[slot].append(index)
        room[slot] -= lengths[index]
    return groups


def balanced_groups(lengths: list[int], count: int) -> list[list[int]]:
    """`count` non-empty groups of item indices with near-equal sums (longest first, each to the
    lightest group), for micro-batches of about equal work."""
    groups: list[list[int]] = [[] for _ in range(min(count, len(lengths)))]
    loads = [0] * len(groups)
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        lightest = loads.index(min(loads))
        groups[lightest].append(index)
        loads[lightest] += lengths[index]
    return groups


@dataclass
class PackedRows:
    """Samples packed end to end into rows with no padding between them; each attends only to
    itself (`segment_ids`, 0 on the padding at a row's end) and its positions restart at 0."""
    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor  # [R, W]
    segment_ids: torch.Tensor  # [R, W]
    # Where the output that scores response token j of sample b sits: [rows[b, j], cols[b, j]].
    rows: torch.Tensor  # [B, N]
    cols: torch.Tensor  # [B, N]


def pack_rows(batch: Batch) -> PackedRows:
    """The batch's real tokens packed into rows as wide as its longest sample."""
    mask = batch["attention_mask"].bool()
    sequences, device = batch["sequences"], batch["sequences"].device
    lengths = mask.sum(1).tolist()
    prompt_lengths = mask[:, :batch.prompt_len].sum(1).tolist()
    width, response_width = max(lengths), sequences.shape[1] - batch.prompt_len
    groups = first_fit(lengths, width)
    input_ids = torch.zeros(len(groups), width, dtype=torch.long, device=device)
    position_ids, segment_ids = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    rows = torch.zeros(len(batch), response_width, dtype=torch.long, device=device)
    cols = torch.zeros_like(rows)
    steps = torch.arange(response_width, device=device)
    for row, group in enumerate(groups):
        start = 0
        for segment, sample in enumerate(group, 1):
            n, prompt = lengths[sample], prompt_lengths[sample]
            input_ids[row, start:start + n] = sequences[sample][mask[sample]]
            position_ids[row, start:start + n] = torch.arange(n, device=device)
            segment_ids[row, start:start + n] = segment
            rows[sample] = row
            # Response token j is scored one position before it; past the response (masked out
            # by the caller) point at its last real position.
            cols[sample] = start + prompt - 1 + steps.clamp(max=max(n - prompt - 1, 0))
            start += n
    return PackedRows(input_ids, position_ids, segment_ids, rows, cols)
