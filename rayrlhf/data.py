"""Datasets: prompts (PPO), demonstrations (SFT) and preference pairs (reward model), from JSONL,
Parquet, a local HF `datasets` directory, or a built-in synthetic task.

Everything is read and tokenised in the driver before any actor starts, so a bad file fails fast.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rayrlhf.batch import Batch, build_batch, first_fit
from rayrlhf.errors import DataError
from rayrlhf.tasks import TASKS, demonstrations, preference_pairs


@dataclass
class Prompt:
    # As the dataset gives it: a string, or a conversation (a list of {"role", "content"} messages,
    # system turns included). Reward functions and reward models receive it as it is.
    text: str | list[dict]
    token_ids: list[int]
    # The row's other columns, passed to a reward function as keyword lists.
    fields: dict = field(default_factory=dict)
    # Where it comes from: its row in the dataset file (or the built-in task's list).
    row: int = -1


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    try:
        if path.is_dir():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise DataError(f"dataset directory {path} has no 'train' split "
                                    f"(splits: {', '.join(loaded)})")
                loaded = loaded["train"]
            return list(loaded)
        if path.suffix in (".jsonl", ".json"):
            rows = []
            with path.open(encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            return rows
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is the file's problem
        raise DataError(f"cannot read dataset {path}: {err}") from None
    raise DataError(f"dataset {path}: unsupported format (use .jsonl, .parquet or a datasets directory)")


def encode_prompts(tokenizer, prompts: list, chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt. A conversation goes through the tokenizer's chat template (with
    the assistant turn opened); a string does too, as one user turn, when `chat_template`, else it
    is encoded as it is (with the tokenizer's special tokens, e.g. BOS). Batched: a 100k-prompt
    dataset takes seconds."""
    ids: list[list[int] | None] = [None] * len(prompts)
    templated, plain = [], []
    for i, prompt in enumerate(prompts):
        (templated if through_template(prompt, chat_template) else plain).append(i)
    if templated:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template, which conversational prompts and "
                            "data.chat_template=true need (use a chat model's tokenizer, or give "
                            "plain string prompts with data.chat_template=false)")
        texts = [tokenizer.apply_chat_template(_as_conversation(prompts[i]), add_generation_prompt=True,
                                               tokenize=False) for i in templated]
        for i, row in zip(templated, tokenizer(texts, add_special_tokens=False).input_ids, strict=True):
            ids[i] = row
    if plain:
        for i, row in zip(plain, tokenizer([prompts[i] for i in plain]).input_ids, strict=True):
            ids[i] = row
    return ids


def through_template(prompt: str | list[dict], chat_template: bool) -> bool:
    """Whether a prompt goes through the chat template: a conversation always, a string when
    data.chat_template."""
    return chat_template or not isinstance(prompt, str)


def _as_conversation(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def reward_model_batch(tokenizer, prompts: list, responses: list[str], chat_template: bool) -> Batch:
    """A reward model's own tokens for (prompt, response) texts, in the shared layout: the prompt
    (a string or a conversation) encoded as the data pipeline encodes the policy's
    (encode_prompts), the response after it. In-process reward models with another tokenizer
    than the policy and the remote reward server both score this."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return build_batch(encode_prompts(tokenizer, prompts, chat_template),
                       [tokenizer(r, add_special_tokens=False).input_ids for r in responses], pad_id)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map every token to the same id (so one's ids mean the same to the other)."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def _no_task(key: str) -> DataError:
    return DataError(f"no data: set {key} or data.task (built-in tasks: {', '.join(TASKS)})")


def load_prompts(data_cfg, tokenizer, seed: int, path: str | None = None, size: int | None = None,
                 held_out: bool = False) -> list[Prompt]:
    """Read, check and tokenise every prompt. One over data.max_prompt_tokens is an error, or with
    data.overlong_prompts=drop is left out and counted.

    `path` and `size` default to data.path and data.synthetic_size (evaluation passes its own, and
    `held_out` for the task's evaluation prompts).
    """
    path = data_cfg.path if path is None else path
    rows: list[dict] = []
    if path:
        rows = _read_rows(Path(path))
        if not rows:
            raise DataError(f"dataset {path} is empty")
        texts = [_prompt_field(row, data_cfg.prompt_field, f"dataset {path}, row {i}")
                 for i, row in enumerate(rows)]
    else:
        if not data_cfg.task:
            raise _no_task("data.path")
        texts = TASKS[data_cfg.task].prompts(size or data_cfg.synthetic_size, seed, held_out)

    prompts, overlong = [], 0
    limit = data_cfg.max_prompt_tokens
    for i, (text, ids) in enumerate(zip(texts, encode_prompts(tokenizer, texts, data_cfg.chat_template),
                                        strict=True)):
        if not ids:
            raise DataError(f"prompt {i} is empty after tokenisation")
        if len(ids) > limit:
            if data_cfg.overlong_prompts == "error":
                raise DataError(f"prompt {i} has {len(ids)} tokens, more than data.max_prompt_tokens="
                                f"{limit}: {str(text)[:60]!r} (data.overlong_prompts=drop leaves such "
                                "prompts out)")
            overlong += 1
            continue
        fields = {k: v for k, v in rows[i].items() if k != data_cfg.prompt_field} if rows else {}
        prompts.append(Prompt(text, ids, fields, i))
    if overlong:
        print(f"left out {overlong} of {len(texts)} prompts over data.max_prompt_tokens={limit} "
              "(data.overlong_prompts=drop)", flush=True)
    if not prompts:
        raise DataError(f"every one of the {len(texts)} prompts is over data.max_prompt_tokens={limit}")
    return prompts


def _prompt_field(row, name: str, where: str, key: str = "data.prompt_field") -> str | list[dict]:
    """A non-empty string, or a conversation: a non-empty list of {"role": str, "content": str}."""
    value = row.get(name) if isinstance(row, dict) else None
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if isinstance(value, list):
        raise DataError(f"{where}: field '{name}' is a list but not a conversation (a non-empty list of "
                        "{\"role\": str, \"content\": str} messages)")
    return _text_field(row, name, where, key)


def _text_field(row, name: str, where: str, key: str, allow_empty: bool = False) -> str:
    value = row.get(name) if isinstance(row, dict) else None
    if not isinstance(value, str) or not (value or allow_empty):
        raise DataError(f"{where}: no {'' if allow_empty else 'non-empty '}string field '{name}' (set {key})")
    return value


# Supervised data: SFT demonstrations (one response) and preference pairs (chosen, rejected).

@dataclass
class SupervisedData:
    # (prompt_ids, response_ids, trained) per SFT example (trained: 1 on the response tokens the loss
    # predicts), (prompt_ids, chosen_ids, rejected_ids) per pair; responses end with EOS unless cut.
    train: list[tuple[list[int], ...]]
    eval: list[tuple[list[int], ...]]
    # Examples dropped or changed, by reason (train and held-out together).
    counts: dict[str, int]

    def describe(self) -> str:
        changed = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.counts.items() if v)
        return f"{len(self.train)} training and {len(self.eval)} held-out examples" + \
            (f" ({changed})" if changed else "")


def load_supervised(stage: str, data_cfg, task: str, tokenizer, seed: int) -> SupervisedData:
    """`stage` "sft" reads (prompt, response) rows; "rm" reads (prompt, chosen, rejected) rows.

    A missing or non-string field is an error naming the row. Empty responses, identical
    chosen/rejected pairs and prompts that leave no room for a response are dropped; responses
    over `max_tokens` are truncated or dropped (`overlong`); every such example is counted.
    """
    keys = ("response_field",) if stage == "sft" else ("chosen_field", "rejected_field")
    fields = tuple(data_cfg[k] for k in keys)
    if data_cfg.path:
        train_rows = _read_rows(Path(data_cfg.path))
        source, eval_source, eval_first_row = data_cfg.path, data_cfg.eval_path, 0
        if data_cfg.eval_path:
            eval_rows = _read_rows(Path(data_cfg.eval_path))
        else:
            cut = len(train_rows) - max(1, round(len(train_rows) * data_cfg.eval_fraction))
            train_rows, eval_rows = train_rows[:cut], train_rows[cut:]
            eval_source, eval_first_row = data_cfg.path, cut
    else:
        if not task:
            raise _no_task(f"{stage}.data.path")
        make = demonstrations if stage == "sft" else preference_pairs
        train_rows = make(task, data_cfg.synthetic_size, seed)
        eval_rows = make(task, max(64, round(data_cfg.synthetic_size * data_cfg.eval_fraction)), seed + 1,
                         held_out=True)
        fields = ("response",) if stage == "sft" else ("chosen", "rejected")
        source = eval_source = f"built-in task {task}"
        eval_first_row = 0
    counts = dict.fromkeys(("empty_response", "identical_pair", "overlong_truncated", "overlong_dropped"), 0)
    train = _encode(train_rows, fields, keys, stage, data_cfg, tokenizer, source, 0, counts)
    held_out = _encode(eval_rows, fields, keys, stage, data_cfg, tokenizer, eval_source, eval_first_row,
                       counts)
    if not train or not held_out:
        raise DataError(f"{stage} data from {source}: no usable {'training' if not train else 'held-out'} "
                        f"examples left ({counts})")
    return SupervisedData(train, held_out, counts)


def _encode(rows: list, fields: tuple[str, ...], keys: tuple[str, ...], stage: str, data_cfg, tokenizer,
            source: str, first_row: int, counts: dict[str, int]) -> list[tuple[list[int], ...]]:
    examples = []
    for i, row in enumerate(rows, first_row):
        where = f"{source}, row {i}"
        prompt = encode_prompts(tokenizer, [_prompt_field(row, data_cfg.prompt_field, where,
                                                          f"{stage}.data.prompt_field")],
                                data_cfg.chat_template)[0]
        if stage == "sft":
            chat = through_template(row.get(data_cfg.prompt_field), data_cfg.chat_template)
            response, trained = _sft_response(row, fields[0], where, data_cfg, tokenizer, chat)
            if response is None:
                counts["empty_response"] += 1
                continue
            responses = [response]
        else:
            texts = [_text_field(row, f, where, f"{stage}.data.{k}", allow_empty=True)
                     for f, k in zip(fields, keys, strict=True)]
            if not all(t.strip() for t in texts):
                counts["empty_response"] += 1
                continue
            responses = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                         for t in texts]
        room = data_cfg.max_tokens - len(prompt)
        if room < 1 or (data_cfg.overlong == "drop" and max(map(len, responses)) > room):
            counts["overlong_dropped"] += 1
            continue
        if max(map(len, responses)) > room:
            counts["overlong_truncated"] += 1
            responses = [r[:room] for r in responses]
        if len(responses) == 2 and responses[0] == responses[1]:
            counts["identical_pair"] += 1
            continue
        examples.append((prompt, *responses, trained[:room]) if stage == "sft" else (prompt, *responses))
    return examples


def _sft_response(row: dict, name: str, where: str, data_cfg, tokenizer, chat: bool
                  ) -> tuple[list[int] | None, list[int] | None]:
    """An SFT response's token ids and which of them are trained on: a string (every token and
    EOS), or the turns of a multi-turn demonstration, a list of messages that ends with the
    assistant's: the assistant's tokens (each turn closed by EOS) are trained on, the others
    (tool results, user turns) are laid out as a rollout's observations are (agent.
    ObservationEncoder) and are not. (None, None) for an empty response."""
    from rayrlhf.agent import ObservationEncoder

    value = row.get(name) if isinstance(row, dict) else None
    eos = tokenizer.eos_token_id
    if not isinstance(value, list):
        text = _text_field(row, name, where, f"sft.data.{name}", allow_empty=True)
        if not text.strip():
            return None, None
        ids = tokenizer(text, add_special_tokens=False).input_ids + [eos]
        return ids, [1] * len(ids)
    turns = _prompt_field(row, name, where, f"sft.data.{name}")
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: the multi-turn response '{name}' must end with an assistant message")
    encoder, ids, trained = ObservationEncoder(tokenizer), [], []
    for i, message in enumerate(turns):
        if message["role"] == "assistant":
            # A templateless turn ends at EOS only where the demonstration ends (a tool call ends
            # at its own text, as a rollout's turn ends at its stop string).
            closes = chat or i == len(turns) - 1
            part = tokenizer(message["content"], add_special_tokens=False).input_ids
            part += [eos] if closes else []
            ids += part
            trained += [1] * len(part)
        else:
            part = encoder.encode(message, chat, ended_with_eos=bool(ids) and ids[-1] == eos)
            ids += part
            trained += [0] * len(part)
    return ids, trained


# An SFT example: prompt token ids, response token ids and, optionally, 1 on the response tokens
# trained on (all of them without it).
Example = tuple[list[int], ...]


def sft_batch(rows: list[list[Example]], pad_id: int) -> Batch:
    """Rows of one or more (prompt, response) examples each (several when packed), right-padded.

    `loss_mask` marks the tokens the loss predicts (response tokens the example trains on: a
    multi-turn demonstration's tool results are not); `segment_ids` number
    the examples of a row from 1 (0 is padding), so attention can stay within an example, and
    positions restart at each example.
    """
    width = max(sum(len(e[0]) + len(e[1]) for e in row) for row in rows)
    tensors = {k: torch.zeros(len(rows), width, dtype=torch.long)
               for k in ("sequences", "loss_mask", "segment_ids", "position_ids")}
    tensors["sequences"].fill_(pad_id)
    for i, row in enumerate(rows):
        at = 0
        for segment, (prompt, response, *trained) in enumerate(row, 1):
            n = len(prompt) + len(response)
            tensors["sequences"][i, at:at + n] = torch.tensor(prompt + response)
            tensors["loss_mask"][i, at + len(prompt):at + n] = torch.tensor(trained[0]) if trained else 1
            tensors["segment_ids"][i, at:at + n] = segment
            tensors["position_ids"][i, at:at + n] = torch.arange(n)
            at += n
    return Batch(0, tensors)


def pack(examples: list[Example], max_tokens: int) -> list[list[Example]]:
    """First-fit decreasing: examples grouped into rows of at most `max_tokens` tokens."""
    groups = first_fit([len(e[0]) + len(e[1]) for e in examples], max_tokens)
    return [[examples[i] for i in group] for group in groups]


def preference_batch(examples: list[tuple[list[int], list[int], list[int]]], pad_id: int) -> Batch:
    """Pairs in the shared layout, [B, 2, ...]: index 0 the chosen response, 1 the rejected."""
    flat = build_batch([e[0] for e in examples for _ in range(2)], [r for e in examples for r in e[1:]],
                       pad_id)
    return Batch(flat.prompt_len, {k: v.view(len(examples), 2, *v.shape[1:])
                                   for k, v in flat.tensors.items()})


class PromptSampler:
    """Endless shuffled passes over the prompts, reproducible from the seed."""

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int):
        self.prompts = prompts
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order)}

    def restore(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])

    def next_batch(self) -> list[Prompt]:
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
            batch.append(self.prompts[self.order.pop()])
        return batch
