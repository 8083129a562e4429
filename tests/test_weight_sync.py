"""The engine side of the weight sync, on a real vLLM engine in this process: weights written into
the shared-memory file as trainer rank 0 writes them must be what the engine then samples with,
and nothing the engine computes may depend on the file between syncs."""

import os

import pytest
import torch

from rayrlhf import cpu_platform, weight_sync
from rayrlhf.algorithms import Sampling
from rayrlhf.batch import build_batch
from rayrlhf.config import load_config
from rayrlhf.modeling import load_causal_lm, policy_logprobs

pytestmark = pytest.mark.integration


def _engine_agrees(engine, policy, prompts, sampling):
    """The engine's log-probs of its own samples match `policy`'s."""
    samples = [group[0] for group in engine.generate(prompts)]
    batch = build_batch(prompts, [s.response_ids for s in samples], pad_id=0)
    with torch.no_grad():
        trainer_side = policy_logprobs(policy, batch, sampling)
    return all(torch.allclose(trainer_side[row, :len(s.logprobs)], torch.tensor(s.logprobs), atol=1e-4)
               for row, s in enumerate(samples))


def _perturbed(policy, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))


@pytest.mark.parametrize(("family", "eager", "placed", "block_size"), [
    ("tiny", True, True, 32), ("tiny", False, False, 0), ("qwen2", True, True, 0),
    ("mistral", True, False, 0)],
    ids=["tiny-eager-weights_in_file-blocks_of_32", "tiny-compiled-weights_copied",
         "qwen2-tied-weights_in_file", "mistral-untied"])
def test_a_cpu_engine_loads_each_sync_in_place(tiny_policy, realistic_models, monkeypatch, family, eager,
                                               placed, block_size):
    """vLLM's CPU backend packs the linear layers' weights; the engine keeps the plain ones (those of
    the layers that compute from their packed copy alone as views of the shared file), loads each
    sync into the rest and packs again, also into a compiled model (enforce_eager false). A layer
    left with its old packing (or a sync that fell back to vLLM's reload) fails this. The trainer's
    weights either live in the file (place_in_shared: updated there, nothing copied at the sync) or
    are copied into it at each sync. The KV cache has vLLM's blocks or rollout.block_size's.

    Between syncs the engine must compute with the weights it last loaded, whatever the file holds:
    right after mapping a file nobody wrote yet, and while the trainer writes the next weights.
    The realistic models' 131k-token vocabularies need no padding, so their embedding tables have
    the file's shapes, and the lookup reads its table as it is (with tied embeddings, the LM head's
    too): it must stay the engine's own."""
    from rayrlhf.vllm_engine import VLLMEngine

    path = tiny_policy if family == "tiny" else realistic_models(family)
    cfg = load_config("conf/tiny_ppo.yaml", ["rollout.max_new_tokens=6", f"rollout.enforce_eager={eager}",
                                             f"rollout.block_size={block_size}"])
    engine = VLLMEngine(path, "", cfg.rollout, "float32", seed=0, max_model_len=64)
    if block_size:
        assert engine.llm.llm_engine.vllm_config.cache_config.block_size == block_size
    in_place = []
    load_in_place = cpu_platform.load_in_place

    def recording_load_in_place(worker, weights):
        in_place.append(load_in_place(worker, weights))
        return in_place[-1]

    monkeypatch.setattr(cpu_platform, "load_in_place", recording_load_in_place)

    policy = load_causal_lm(path, "float32")
    plan = weight_sync.plan_buckets(weight_sync.parameter_specs(policy), bucket_bytes=64 * 1024)
    path_in_shm, shared = weight_sync.create_shared_file(plan)
    engine.map_shared_weights(path_in_shm, plan)
    os.unlink(path_in_shm)
    read_in_place = engine.llm.collective_rpc(lambda worker: sorted(worker.rayrlhf_read_in_place))[0]
    assert not any("embed_tokens" in name for name in read_in_place), read_in_place
    if family == "tiny":
        # The packed layers' weights lie in the file as the engine stacks them (q, k, v; gate, up),
        # so they are re-packed straight from it; the embeddings and norms load as before.
        projections = [f"self_attn.{p}_proj" for p in "qkvo"] + \
            [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
        expected = [f"model.layers.{i}.{proj}.weight" for i in range(policy.config.num_hidden_layers)
                    for proj in projections]
        assert read_in_place == sorted(expected)
    vocab = policy.config.vocab_size
    prompts = [[10 % vocab, 1100 % vocab, 2000 % vocab], [5000 % vocab, 200 % vocab, 7 % vocab, 31], [7, 8]]
    # The file holds zeros (nobody wrote it yet): the engine still samples from its checkpoint.
    assert _engine_agrees(engine, policy, prompts, Sampling.of(cfg.rollout))
    if placed:
        assert weight_sync.place_in_shared(policy, shared, plan) == len(list(policy.parameters()))
        file_start = shared.data_ptr()
        assert all(file_start <= p.data_ptr() < file_start + shared.numel() for p in policy.parameters())
    loaded = load_causal_lm(path, "float32")  # what the engine holds
    for seed in (1, 2):  # the second sync must replace what the first one packed
        _perturbed(policy, seed)
        weight_sync.SharedMemorySender(shared).send(policy, plan)[0]
        # Written but not yet received: the engine still has the weights of the last sync.
        assert _engine_agrees(engine, loaded, prompts, Sampling.of(cfg.rollout)), seed
        engine.receive_weights(plan)
        assert _engine_agrees(engine, policy, prompts, Sampling.of(cfg.rollout)), seed
        loaded.load_state_dict(policy.state_dict())
    assert in_place == [True, True]
