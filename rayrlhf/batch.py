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


def pair_rows(pairs: Batch) -> Batch:
    """Preference pairs [B, 2, ...] (data.preference_batch) as 2B rows: chosen, rejected, chosen, ..."""
    return Batch(pairs.prompt_len, {k: v.flatten(0, 1) for k, v in pairs.tensors.items()})


def concat_batches(batches: list[Batch], pad_id: int) -> Batch:
    """The rows of `batches` in one batch of the shared layout: prompts left-padded to the longest
    prompt width, responses right-padded to the longest response width. Per-row tensors [B] are
    joined; [B, N] ones (aligned with the responses) and [B, P + N] ones (with the sequences) are
    padded, with pad_id in `sequences` and 0 elsewhere."""
    prompt_len = max(b.prompt_len for b in batches)
    widths = [b["sequences"].shape[1] - b.prompt_len for b in batches]
    response_len = max(widths)
    tensors = {}
    for key in batches[0].tensors:
        fill = pad_id if key == "sequences" else 0
        parts = []
        for b, width in zip(batches, widths, strict=True):
            t = b[key]
            if t.dim() > 1:
                prompt = t[:, :t.shape[1] - width]  # empty for the response-aligned tensors
                right = t.new_full((len(t), response_len - width), fill)
                left = t.new_full((len(t), prompt_len - b.prompt_len if prompt.shape[1] else 0), fill)
                t = torch.cat([left, prompt, t[:, prompt.shape[1]:], right], dim=1)
            parts.append(t)
        tensors[key] = torch.cat(parts)
    return Batch(prompt_len, tensors)


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
    """Samples packed end to end into rows with no padding between them. A segment is one prompt
    followed by the responses to it (one, or with `share_prompts` every response in the batch
    to the same prompt, so the prompt is computed once); each response attends to its prompt
    and itself only, and its positions continue from the prompt's."""
    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor  # [R, W]
    segment_ids: torch.Tensor  # [R, W]: 1, 2, ... per segment of a row; 0 on the row's end padding
    sample_ids: torch.Tensor  # [R, W]: 0 on a segment's prompt, k on its k-th response
    # Where the output that scores response token j of sample b sits: [rows[b, j], cols[b, j]].
    rows: torch.Tensor  # [B, N]
    cols: torch.Tensor  # [B, N]


def prompt_groups(batch: Batch) -> list[list[int]]:
    """Sample indices grouped by identical prompt tokens, in order of first appearance."""
    prompts = batch["sequences"][:, :batch.prompt_len]
    real = batch["attention_mask"][:, :batch.prompt_len].bool()
    groups: dict[tuple[int, ...], list[int]] = {}
    for sample in range(len(batch)):
        groups.setdefault(tuple(prompts[sample][real[sample]].tolist()), []).append(sample)
    return list(groups.values())


def segment_sizes(batch: Batch, segments: list[list[int]]) -> list[int]:
    """Tokens of each segment packed with one copy of its samples' (common) prompt."""
    mask = batch["attention_mask"].bool()
    prompt_lengths = mask[:, :batch.prompt_len].sum(1).tolist()
    response_lengths = mask[:, batch.prompt_len:].sum(1).tolist()
    return [prompt_lengths[s[0]] + sum(response_lengths[i] for i in s) for s in segments]


def pack_rows(batch: Batch, share_prompts: bool = False) -> PackedRows:
    """The batch's real tokens packed into rows as wide as its longest segment."""
    mask = batch["attention_mask"].bool()
    sequences, device, width_p = batch["sequences"], batch["sequences"].device, batch.prompt_len
    prompt_lengths = mask[:, :width_p].sum(1).tolist()
    response_lengths = mask[:, width_p:].sum(1).tolist()
    segments = prompt_groups(batch) if share_prompts else [[sample] for sample in range(len(batch))]
    sizes = segment_sizes(batch, segments)
    width, response_width = max(sizes), sequences.shape[1] - width_p
    rows_of_segments = first_fit(sizes, width)
    input_ids = torch.zeros(len(rows_of_segments), width, dtype=torch.long, device=device)
    position_ids, segment_ids = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    sample_ids = torch.zeros_like(input_ids)
    rows = torch.zeros(len(batch), response_width, dtype=torch.long, device=device)
    cols = torch.zeros_like(rows)
    steps = torch.arange(response_width, device=device)
    for row, members in enumerate(rows_of_segments):
        start = 0
        for segment_id, segment in enumerate(members, 1):
            samples = segments[segment]
            prompt = prompt_lengths[samples[0]]
            input_ids[row, start:start + prompt] = sequences[samples[0], :width_p][mask[samples[0], :width_p]]
            position_ids[row, start:start + prompt] = torch.arange(prompt, device=device)
            prompt_last, start = start + prompt - 1, start + prompt
            for sample_id, sample in enumerate(samples, 1):
                n = response_lengths[sample]
                input_ids[row, start:start + n] = sequences[sample, width_p:width_p + n]
                position_ids[row, start:start + n] = torch.arange(prompt, prompt + n, device=device)
                sample_ids[row, start:start + n] = sample_id
                rows[sample] = row
                # Token 0 is scored at the prompt's last position, token j at response token
                # j - 1; past the response (masked out by the caller) at its last scoring position.
                last = start + n - 2 if n >= 2 else prompt_last
                cols[sample] = torch.where(steps == 0, prompt_last, (start + steps - 1).clamp(max=last))
                start += n
            segment_ids[row, start - sizes[segment]:start] = segment_id
    return PackedRows(input_ids, position_ids, segment_ids, sample_ids, rows, cols)


def row_tokens(batch: Batch) -> torch.Tensor:
    """Real tokens in each row (a preference pair's two sequences together)."""
    if "attention_mask" in batch.tensors:
        return batch["attention_mask"].flatten(1).sum(1)
    return (batch["segment_ids"] > 0).sum(1)


def row_micro_batches(batch: Batch, size: int) -> list[tuple[torch.Tensor, Batch]]:
    """(row indices, rows) of each micro-batch of `size` consecutive rows."""
    return [(torch.arange(i, min(i + size, len(batch))), batch.select(slice(i, i + size)))
            for i in range(0, len(batch), size)]


def token_micro_batches(batch: Batch, count: int, keep_groups: bool) -> list[tuple[torch.Tensor, Batch]]:
    """(row indices, rows) of `count` micro-batches balanced by real tokens; with `keep_groups`,
    each prompt group's rows stay together where there are enough groups to go round."""
    units, unit_tokens = [[row] for row in range(len(batch))], row_tokens(batch).tolist()
    if keep_groups:
        groups = prompt_groups(batch)
        if len(groups) >= count:
            units, unit_tokens = groups, segment_sizes(batch, groups)
    parts = balanced_groups(unit_tokens, count)
    if len(parts) < count:
        raise ValueError(f"{len(batch)} rows cannot fill {count} micro-batches")
    return [(index, batch.select(index)) for index in
            (torch.tensor([row for unit in part for row in units[unit]]) for part in parts)]


def shuffled_rows(batch: Batch, generator: torch.Generator, keep_groups: bool) -> torch.Tensor:
    """A random order of the rows; with `keep_groups`, of whole prompt groups, so that the
    responses to one prompt stay together in a micro-batch and share its computation."""
    if not keep_groups:
        return torch.randperm(len(batch), generator=generator)
    groups = prompt_groups(batch)
    return torch.tensor([row for g in torch.randperm(len(groups), generator=generator).tolist()
                         for row in groups[g]])
