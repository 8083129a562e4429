"""The engine side of the weight sync, on a real vLLM engine in this process: weights written into
the shared-memory file as trainer rank 0 writes them must be what the engine then samples with."""

import os

import pytest
import torch

from rayrlhf import weight_sync
from rayrlhf.batch import build_batch
from rayrlhf.config import load_config
from rayrlhf.modeling import load_causal_lm, policy_logprobs

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("eager", "placed", "block_size"), [(True, True, 32), (False, False, 0)],
                         ids=["eager-weights_in_file-blocks_of_32", "compiled-weights_copied"])
def test_a_cpu_engine_loads_each_sync_in_place(tiny_policy, monkeypatch, eager, placed, block_size):
    """vLLM's CPU backend packs the linear layers' weights; the engine keeps the plain ones (the
    packed layers' as views of the shared file), loads each sync into the rest and packs again,
    also into a compiled model (enforce_eager false). A layer left with its old packing (or a sync
    that fell back to vLLM's reload) fails this. The trainer's weights either live in the file
    (place_in_shared: updated there, nothing copied at the sync) or are copied into it at each
    sync. The KV cache has vLLM's blocks or rollout.block_size's."""
    from rayrlhf.rollout import RolloutWorker

    cfg = load_config("conf/tiny_ppo.yaml", ["rollout.max_new_tokens=6", f"rollout.enforce_eager={eager}",
                                             f"rollout.block_size={block_size}"])
    engine = RolloutWorker(tiny_policy, "", cfg.rollout, "float32", seed=0, max_model_len=64)
    if block_size:
        assert engine.llm.llm_engine.vllm_config.cache_config.block_size == block_size
    in_place = []
    load_in_place = weight_sync.load_in_place

    def recording_load_in_place(worker, weights):
        in_place.append(load_in_place(worker, weights))
        return in_place[-1]

    monkeypatch.setattr(weight_sync, "load_in_place", recording_load_in_place)

    policy = load_causal_lm(tiny_policy, "float32")
    plan = weight_sync.plan_buckets(weight_sync.parameter_specs(policy), bucket_bytes=64 * 1024)
    path, shared = weight_sync.create_shared_file(plan)
    engine.map_shared_weights(path, plan)
    os.unlink(path)
    # The packed layers' weights lie in the file as the engine stacks them (q, k, v; gate, up), so
    # they are re-packed straight from it; the embeddings and norms load as before.
    read_in_place = engine.llm.collective_rpc(lambda worker: sorted(worker.rayrlhf_read_in_place))[0]
    projections = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert read_in_place == sorted(f"model.layers.{i}.{proj}.weight"
                                   for i in range(policy.config.num_hidden_layers) for proj in projections)
    if placed:
        assert weight_sync.place_in_shared(policy, shared, plan) == len(list(policy.parameters()))
        file_start = shared.data_ptr()
        assert all(file_start <= p.data_ptr() < file_start + shared.numel() for p in policy.parameters())
    prompts = [[10, 11, 12], [20, 21, 22, 23], [7, 8]]
    for seed in (1, 2):  # the second sync must replace what the first one packed
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(0.05 * torch.randn_like(param))
        weight_sync.send_buckets(policy, plan, is_sender=True, device=torch.device("cpu"), shared=shared)
        engine.receive_weights(plan)
        samples = [group[0] for group in engine.generate(prompts)]
        batch = build_batch(prompts, [s.response_ids for s in samples], pad_id=0)
        with torch.no_grad():
            trainer_side = policy_logprobs(policy, batch, cfg.rollout.temperature)
        for row, sample in enumerate(samples):
            n = len(sample.logprobs)
            assert torch.allclose(trainer_side[row, :n], torch.tensor(sample.logprobs), atol=1e-4), \
                (seed, row)
    assert in_place == [True, True]
