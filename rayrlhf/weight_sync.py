"""The weight-sync channel: actor trainer rank 0 -> every vLLM engine worker.

A torch.distributed group of its own (gloo on CPU, NCCL on GPU) joins trainer rank 0 (rank 0)
and each engine worker (ranks 1..). It is built straight from a TCPStore, so it lives beside
the trainers' DeepSpeed group and vLLM's own group without touching either. Weights travel as
flat buckets of about `bucket_mb`; the engines turn each bucket back into named HF tensors and
stream them into vLLM's in-place reload.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as dist

from rayrlhf.lora import hf_weights

# (HF parameter name, full shape, dtype name)
ParamSpec = tuple[str, tuple[int, ...], str]


def join_group(master_addr: str, port: int, rank: int, world_size: int, backend: str,
               timeout_s: float):
    """Rank 0 hosts the store; every member blocks here until all `world_size` have joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, port, world_size, is_master=(rank == 0), timeout=timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def plan_buckets(specs: list[ParamSpec], bucket_bytes: int) -> list[list[ParamSpec]]:
    """Consecutive parameters of one dtype, at most `bucket_bytes` a bucket (a larger tensor goes alone)."""
    buckets: list[list[ParamSpec]] = []
    size = 0
    for spec in specs:
        nbytes = _numel(spec[1]) * torch.empty((), dtype=getattr(torch, spec[2])).element_size()
        if not buckets or size + nbytes > bucket_bytes or buckets[-1][0][2] != spec[2]:
            buckets.append([])
            size = 0
        buckets[-1].append(spec)
        size += nbytes
    return buckets


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def parameter_specs(module: torch.nn.Module) -> list[ParamSpec]:
    """The plain HF weights (LoRA merged), with full shapes also for ZeRO-3 partitioned
    parameters (which keep theirs in `ds_shape`)."""
    return [(name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
            for name, (p, *_), _ in hf_weights(module)]


def gathered(params: list[torch.nn.Parameter]):
    """Full tensors for the duration of the block; a collective under ZeRO-3, a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def send_buckets(module: torch.nn.Module, plan: list[list[ParamSpec]], group, is_sender: bool,
                 device: torch.device) -> int:
    """Called on every trainer rank (the ZeRO-3 gather needs them all); rank 0 broadcasts.

    Returns the bytes sent.
    """
    weights = {name: (parts, compute) for name, parts, compute in hf_weights(module)}
    sent = 0
    for bucket in plan:
        entries = [weights[name] for name, _, _ in bucket]
        with gathered([p for parts, _ in entries for p in parts]):
            if is_sender:
                flat = torch.cat([compute().reshape(-1) for _, compute in entries]).to(device)
                group.broadcast(flat, 0).wait()
                sent += flat.numel() * flat.element_size()
    return sent


def receive_buckets(group, plan: list[list[ParamSpec]], device: torch.device
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) as each bucket arrives, for vLLM's `reload_weights` iterator."""
    for bucket in plan:
        numel = sum(_numel(shape) for _, shape, _ in bucket)
        flat = torch.empty(numel, dtype=getattr(torch, bucket[0][2]), device=device)
        group.broadcast(flat, 0).wait()
        offset = 0
        for name, shape, _ in bucket:
            n = _numel(shape)
            yield name, flat[offset:offset + n].view(shape)
            offset += n


# The two functions below run inside each vLLM worker through `LLM.collective_rpc`, so that
# with tensor parallelism every worker process joins the group and loads its own shard.

def engine_join(worker, master_addr: str, port: int, first_rank: int, world_size: int,
                backend: str, timeout_s: float) -> None:
    worker.rayrlhf_sync_group = join_group(master_addr, port, first_rank + worker.rank,
                                           world_size, backend, timeout_s)


def engine_receive(worker, plan: list[list[ParamSpec]]) -> None:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    worker.reload_weights(weights_iterator=receive_buckets(worker.rayrlhf_sync_group, plan, device))
