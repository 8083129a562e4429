"""Prompt datasets: JSONL, Parquet, a local HF `datasets` directory, or the built-in synthetic set.

Everything is read and tokenised in the driver before any actor starts, so a bad file fails fast.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from rayrlhf.errors import DataError
from rayrlhf.rewards import SYNTHETIC_PROMPTS


@dataclass
class Prompt:
    text: str
    token_ids: list[int]
    # The row's other columns, passed to a reward function as keyword lists.
    fields: dict = field(default_factory=dict)


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


def load_prompts(data_cfg, tokenizer, reward_function: str, seed: int, path: str | None = None,
                 size: int | None = None) -> list[Prompt]:
    """Read, check and tokenise every prompt; any prompt over the length limit is an error.

    `path` and `size` default to data.path and data.synthetic_size (evaluation passes its own).
    """
    path = data_cfg.path if path is None else path
    rows: list[dict] = []
    if path:
        rows = _read_rows(Path(path))
        if not rows:
            raise DataError(f"dataset {path} is empty")
        texts = []
        for i, row in enumerate(rows):
            value = row.get(data_cfg.prompt_field) if isinstance(row, dict) else None
            if not isinstance(value, str) or not value:
                raise DataError(f"dataset {path}, row {i}: no non-empty string field "
                                f"'{data_cfg.prompt_field}' (set data.prompt_field)")
            texts.append(value)
    else:
        if reward_function not in SYNTHETIC_PROMPTS:
            raise DataError(f"no prompts: set data.path (built-in prompts come only with a built-in "
                            f"reward.function: {', '.join(SYNTHETIC_PROMPTS)})")
        texts = SYNTHETIC_PROMPTS[reward_function](size or data_cfg.synthetic_size, seed)

    prompts = []
    for i, text in enumerate(texts):
        if data_cfg.chat_template:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=False)
            ids = tokenizer(rendered, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(text).input_ids
        if len(ids) > data_cfg.max_prompt_tokens:
            raise DataError(f"prompt {i} has {len(ids)} tokens, more than data.max_prompt_tokens="
                            f"{data_cfg.max_prompt_tokens}: {text[:60]!r}")
        if not ids:
            raise DataError(f"prompt {i} is empty after tokenisation")
        fields = {k: v for k, v in rows[i].items() if k != data_cfg.prompt_field} if rows else {}
        prompts.append(Prompt(text, ids, fields))
    return prompts


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
