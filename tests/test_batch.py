"""The shared token layout: left-padded prompts, right-padded responses, real-token positions."""

import pytest
import torch

from rayrlhf import weight_sync
from rayrlhf.algorithms import Sampling
from rayrlhf.batch import balanced_groups, build_batch, concat_batches, first_fit, pack_rows, position_ids
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


def test_concatenated_batches_keep_the_shared_layout():
    """Prompts of width 1 and 2, responses of width 2 and 1: one batch of prompt width 2 and response
    width 2, each row padded where it was too narrow (pad_id 9 in sequences, 0 elsewhere)."""
    a = build_batch([[5]], [[1, 2]], pad_id=9)
    b = build_batch([[6, 7]], [[3]], pad_id=9)
    for batch in (a, b):
        batch["mask"] = torch.ones(1, batch["sequences"].shape[1] - batch.prompt_len)
        batch["truncated"] = torch.ones(1)
    both = concat_batches([a, b], pad_id=9)
    assert both.prompt_len == 2
    assert both["sequences"].tolist() == [[9, 5, 1, 2], [6, 7, 3, 9]]
    assert both["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 0]]
    assert both["mask"].tolist() == [[1, 1], [1, 0]]
    assert both["response_lengths"].tolist() == [2, 1] and both["truncated"].tolist() == [1, 1]


def test_rollout_groups_and_joins_carry_every_per_sample_field():
    """Groups of two samples: group 1 of the first rollout and group 0 of the second, joined: the
    per-sample lists, metrics and environment errors follow their samples."""
    from rayrlhf.rollout_service import Rollout, join_rollouts

    def rollout(tag, errors):
        batch = build_batch([[1]] * 4, [[2, 3]] * 4, pad_id=0)
        batch["row"] = torch.arange(4)
        return Rollout(batch, [f"{tag}p{i}" for i in range(4)], [f"{tag}r{i}" for i in range(4)],
                       {"answer": [f"{tag}a{i}" for i in range(4)]}, [f"{tag}s0", f"{tag}s1"],
                       env_metrics={"turns": [1.0, 2.0, 3.0, 4.0]}, env_errors=errors,
                       reward_metrics={"hit": torch.tensor([0.0, 1.0, 2.0, 3.0])})

    first, second = rollout("x", {3: "boom"}), rollout("y", {0: "late"})
    second.version = -1
    joined = join_rollouts([first.groups([1], 2), second.groups([0], 2)], pad_id=0)
    assert joined.prompts == ["xp2", "xp3", "yp0", "yp1"] and joined.responses[0] == "xr2"
    assert joined.fields == {"answer": ["xa2", "xa3", "ya0", "ya1"]} and joined.source == ["xs1", "ys0"]
    assert joined.batch["row"].tolist() == [2, 3, 0, 1] and joined.version == -1
    assert joined.env_metrics == {"turns": [3.0, 4.0, 1.0, 2.0]}
    assert joined.env_errors == {1: "boom", 2: "late"}
    assert joined.reward_metrics["hit"].tolist() == [2.0, 3.0, 0.0, 1.0]


def test_weight_sync_buckets_respect_size_and_dtype():
    specs = [("a", (4,), "float32"), ("b", (4,), "float32"), ("c", (8,), "float32"),
             ("d", (2,), "bfloat16")]
    buckets = plan_buckets(specs, bucket_bytes=32)
    assert [[name for name, _, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"]]


def test_shared_memory_file_carries_every_weight_of_mixed_dtypes(tmp_path):
    """What rank 0 writes into the mapped file is what an engine's mapping of it yields."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2).to(torch.bfloat16))
    plan = plan_buckets(weight_sync.parameter_specs(model), bucket_bytes=40)
    offsets = weight_sync.shared_offsets(plan)
    assert len(plan) > 2 and all(offset % 64 == 0 for offset in offsets)
    path = str(tmp_path / "weights")
    writer = weight_sync.map_shared_file(path, offsets[-1])
    sent = weight_sync.SharedMemorySender(writer).send(model, plan)[0]
    assert sent == sum(p.numel() * p.element_size() for p in model.parameters())
    reader = dict(weight_sync.shared_weights(weight_sync.map_shared_file(path, offsets[-1]), plan))
    assert list(reader) == [name for name, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        assert reader[name].dtype == param.dtype and torch.equal(reader[name], param.data), name


def test_weights_placed_in_the_shared_file_reach_it_through_the_optimizer_alone(tmp_path, monkeypatch):
    """place_in_shared: the parameters become views of the file, keep their values, and a fused
    AdamW step updates them there; a sync then finds every weight in place and copies none."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    plan = plan_buckets(weight_sync.parameter_specs(model), bucket_bytes=40)
    path = str(tmp_path / "weights")
    writer = weight_sync.map_shared_file(path, weight_sync.shared_offsets(plan)[-1])
    assert weight_sync.place_in_shared(model, writer, plan) == 4
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    reader = dict(weight_sync.shared_weights(weight_sync.map_shared_file(path, writer.numel()), plan))
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]) and torch.equal(reader[name], param.data), name
    copies = []
    original_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *args, **kwargs:
                        copies.append(src) or original_copy(self, src, *args, **kwargs))
    sent = weight_sync.SharedMemorySender(writer).send(model, plan)[0]
    monkeypatch.undo()
    assert sent == sum(p.numel() * p.element_size() for p in model.parameters()) and copies == []


def test_cuda_ipc_pairs_each_engine_with_the_actor_rank_on_its_gpu():
    actors = [("node-a", ("0",)), ("node-a", ("1",)), ("node-b", ("0",))]
    assert weight_sync.ipc_senders(actors, [("node-a", ("1",)), ("node-b", ("0",))]) == [1, 2]
    # An engine on a GPU no actor rank uses, or on two GPUs, rules CUDA IPC out.
    assert weight_sync.ipc_senders(actors, [("node-a", ("0",)), ("node-b", ("1",))]) is None
    assert weight_sync.ipc_senders(actors, [("node-a", ("0", "1"))]) is None
    assert weight_sync.ipc_senders([("node-a", ())], [("node-a", ())]) is None  # no GPUs at all


def test_first_fit_and_balanced_groups():
    assert first_fit([5, 3, 4, 2, 6], capacity=8) == [[4, 3], [0, 1], [2]]
    assert first_fit([9, 1], capacity=8) == [[0], [1]]  # too long for a row: alone
    groups = balanced_groups([7, 1, 5, 4, 3, 2], count=3)
    assert sorted(sum([7, 1, 5, 4, 3, 2][i] for i in g) for g in groups) == [7, 7, 8]
    assert sorted(i for g in groups for i in g) == list(range(6))


@pytest.mark.parametrize("family", ["tiny", "qwen2", "qwen3", "mistral"])
def test_packed_rows_give_the_unpacked_logprobs_and_values(tiny_policy, tiny_reward_model, realistic_models,
                                                           family):
    """Packing changes where tokens sit, never what each response token is scored with; sharing
    a prompt among its responses computes it once. Also on the realistic test models (q/k/v
    biases, q/k norms, tied embeddings, GQA, vocabularies of 32k and 131k tokens)."""
    from rayrlhf.modeling import load_causal_lm, load_scalar_model, policy_logprobs, token_values

    # Samples 0, 2 and 4 answer one prompt, 1 and 3 another (a group of two, one empty response).
    prompts = [[5, 6, 7, 8, 9], [8], [5, 6, 7, 8, 9], [8], [5, 6, 7, 8, 9], [10, 11]]
    responses = [[1, 2], [3, 4, 9, 12], [13, 14, 15], [], [16], [17, 18]]
    batch = build_batch(prompts, responses, pad_id=0)
    packed = pack_rows(batch)
    assert packed.input_ids.shape == (5, 8)  # rows as wide as the longest sample (5 + 3)
    assert packed.segment_ids.tolist()[0] == [1] * 8 and packed.sample_ids.tolist()[0] == [0] * 5 + [1] * 3
    shared = pack_rows(batch, share_prompts=True)
    assert shared.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 13, 14, 15, 16],
                                         [8, 3, 4, 9, 12, 10, 11, 17, 18, 0, 0]]
    assert shared.sample_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3],
                                          [0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0]]
    assert shared.position_ids.tolist()[0] == [0, 1, 2, 3, 4, 5, 6, 5, 6, 7, 5]
    assert shared.segment_ids.tolist()[1] == [1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]
    # The first token of every response to the first prompt is scored at the prompt's last token.
    assert shared.cols[[0, 2, 4], 0].tolist() == [4, 4, 4] and shared.cols[2, 1:3].tolist() == [7, 8]
    if family != "tiny":
        tiny_policy, tiny_reward_model = realistic_models(family), realistic_models(family, "reward")
    policy, critic = load_causal_lm(tiny_policy, "float32"), load_scalar_model(tiny_reward_model, "float32")
    with torch.no_grad():
        outputs = [(policy_logprobs(policy, batch, Sampling(0.7), packing),
                    token_values(critic, batch, packing)) for packing in ("none", "samples", "prompts")]
    for kind, (logprobs, values) in zip(("samples", "prompts"), outputs[1:], strict=True):
        for row, length in enumerate(batch["response_lengths"].tolist()):
            assert torch.allclose(outputs[0][0][row, :length], logprobs[row, :length], atol=1e-5), (kind, row)
            assert torch.allclose(outputs[0][1][row, :length], values[row, :length], atol=1e-5), (kind, row)


def test_packed_rows_give_the_unpacked_gradients(tiny_policy, realistic_models, tmp_path):
    """The linear layers see a padding-free token stream that only attention lays out in rows, so
    the gradients must come back through that layout too; also with grouped-query attention, under
    LoRA adapters (peft's wrapper must pass the stream's indices on), and on the realistic test
    models (tied embeddings take the gradient of both their uses)."""
    from transformers import AutoConfig, LlamaForCausalLM

    from rayrlhf.adapters import apply_peft
    from rayrlhf.algorithms import response_mask
    from rayrlhf.config import PeftConfig
    from rayrlhf.modeling import load_causal_lm, policy_logprobs

    config = AutoConfig.from_pretrained(tiny_policy)
    config.num_key_value_heads = 2  # of 4 query heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "gqa")
    prompts = [[5, 6, 7, 8, 9], [8], [5, 6, 7, 8, 9], [8], [10, 11]]
    responses = [[1, 2], [3, 4, 9, 12], [13, 14, 15], [], [17, 18, 19, 20, 21, 22]]
    batch = build_batch(prompts, responses, pad_id=0)
    mask = response_mask(batch["sequences"][:, batch.prompt_len:], batch["response_lengths"])
    assert pack_rows(batch, share_prompts=True).segment_ids.eq(0).any()  # rows with end padding
    lora = apply_peft(load_causal_lm(tiny_policy, "float32"), PeftConfig(method="lora", rank=4), False, 1)
    # B starts at zero, which leaves A without a gradient; one non-zero B gives its A one too.
    torch.nn.init.normal_(lora.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight)
    models = [("tiny", load_causal_lm(tiny_policy, "float32")),
              ("gqa", load_causal_lm(str(tmp_path / "gqa"), "float32")), ("lora", lora)]
    models += [(family, load_causal_lm(realistic_models(family), "float32"))
               for family in ("qwen2", "qwen3", "mistral")]
    for name, policy in models:
        grads = []
        for packing in ("none", "samples", "prompts"):
            policy.zero_grad()
            (policy_logprobs(policy, batch, Sampling(0.7), packing) * mask).sum().backward()
            grads.append({key: p.grad.clone() for key, p in policy.named_parameters() if p.requires_grad})
        assert any(grad.abs().sum() > 0 for grad in grads[0].values())
        for kind, packed in zip(("samples", "prompts"), grads[1:], strict=True):
            for key, grad in grads[0].items():
                assert torch.allclose(grad, packed[key], atol=1e-5, rtol=1e-4), (name, kind, key)
