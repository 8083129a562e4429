"""The seams other implementations plug into: the rollout-engine interface and the weight transports."""

import os

import torch

from rayrlhf import weight_sync
from rayrlhf.rollout import ENGINES, RolloutEngine, engine_class

INTERFACE = [name for name, member in vars(RolloutEngine).items()
             if callable(member) and not name.startswith("_")]


def test_every_registered_engine_implements_the_whole_interface():
    assert set(INTERFACE) == {"generate", "join_weight_sync", "map_shared_weights", "receive_weights",
                              "sleep"}
    for name in ENGINES:
        cls = engine_class(name)
        assert issubclass(cls, RolloutEngine), name
        missing = [method for method in INTERFACE if getattr(cls, method) is getattr(RolloutEngine, method)]
        assert missing == [], (name, missing)


def test_a_buffer_written_by_a_sender_reads_back_through_its_receiver(tmp_path):
    """The shared-memory transport's two ends, without an engine: what rank 0's sender writes, the
    engine-side receiver yields, name by name; a rank that only gathers writes nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).to(torch.bfloat16))
    plan = weight_sync.plan_buckets(weight_sync.parameter_specs(model), bucket_bytes=32)
    size = weight_sync.shared_offsets(plan)[-1]
    path = str(tmp_path / "weights")
    sent, handle = weight_sync.SharedMemorySender(weight_sync.map_shared_file(path, size)).send(model, plan)
    assert handle is None and sent == sum(p.numel() * p.element_size() for p in model.parameters())
    received = dict(weight_sync.BufferReceiver(weight_sync.map_shared_file(path, size)).weights(plan))
    assert list(received) == [name for name, _ in model.named_parameters()]
    assert all(torch.equal(received[name], p) for name, p in model.named_parameters())
    assert weight_sync.Sender().send(model, plan) == (0, None)


def test_the_private_vllm_packing_is_patched_only_on_the_versions_checked(monkeypatch, capsys):
    """Another vLLM keeps its own CPU packing (its reload serves the syncs), with one line saying so."""
    import vllm
    from vllm.model_executor.layers import utils

    from rayrlhf import cpu_platform

    original = getattr(utils.dispatch_cpu_unquantized_gemm, "original", utils.dispatch_cpu_unquantized_gemm)
    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", original)
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    cpu_platform.keep_plain_linear_weights()
    assert utils.dispatch_cpu_unquantized_gemm is original
    assert "not on vLLM 0.99.0's; the engine loads each sync through vLLM's reload" in capsys.readouterr().out
    monkeypatch.setattr(vllm, "__version__", cpu_platform.CHECKED_VLLM[0] + "0")
    cpu_platform.keep_plain_linear_weights()
    assert utils.dispatch_cpu_unquantized_gemm.original is original


def test_tensor_parallel_cpu_engines_bind_each_worker_to_cores_of_its_own(monkeypatch):
    """VLLM_CPU_OMP_THREADS_BIND from the engine's bundle: its cpus split over its workers, the
    engines of a node side by side, sharing cores only when the node has too few."""
    from rayrlhf.cpu_platform import tensor_parallel_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert tensor_parallel_cores(2, 4, slot=0) == "0,1|2,3"
    assert tensor_parallel_cores(2, 4, slot=1) == "4,5|6,7"
    assert tensor_parallel_cores(2, 4, slot=2) == "0,1|2,3"
    assert tensor_parallel_cores(4, 2, slot=0) == "0|1|2|3"  # a core per worker at least
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {8, 9})
    assert tensor_parallel_cores(2, 2, slot=0) == "8|9"
