"""The shared token layout: left-padded prompts, right-padded responses, real-token positions."""

import torch

from rayrlhf.batch import build_batch, position_ids
from rayrlhf.weight_sync import plan_buckets


def test_build_batch_aligns_responses_at_one_column():
    batch = build_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert batch.prompt_len == 3
    assert batch["sequences"].tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["response_lengths"].tolist() == [2, 3]
    # Left padding does not shift positions: the first real token is at position 0.
    assert position_ids(batch["attention_mask"])[1].tolist() == [0, 0, 0, 1, 2, 3]


def test_chunks_cover_the_batch_in_order():
    batch = build_batch([[1]] * 5, [[2]] * 5, pad_id=0)
    batch["index"] = torch.arange(5)
    parts = batch.chunks(2)
    assert [p["index"].tolist() for p in parts] == [[0, 1], [2, 3, 4]]


def test_weight_sync_buckets_respect_size_and_dtype():
    specs = [("a", (4,), "float32"), ("b", (4,), "float32"), ("c", (8,), "float32"),
             ("d", (2,), "bfloat16")]
    buckets = plan_buckets(specs, bucket_bytes=32)
    assert [[name for name, _, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"]]
