"""The weight-sync channel: actor trainer rank 0 -> every vLLM engine worker.

Weights travel as flat buckets of about `bucket_mb`; the engines turn each bucket back into
named HF tensors and load them: on CPU in place (see `load_in_place` below), elsewhere through
vLLM's reload. Three transports:
- collective: a torch.distributed group of its own (gloo on CPU, NCCL on GPU) joins trainer
  rank 0 (rank 0) and each engine worker (ranks 1..). It is built straight from a TCPStore, so it
  lives beside the trainers' DeepSpeed group and vLLM's own group without touching either. Rank 0
  broadcasts from a thread of its own (`Broadcaster`), so the trainers never wait on the engines;
- shared memory (CPU, engines on the trainer's node): rank 0 copies the buckets into one file in
  /dev/shm that every engine worker has mapped, and the engines load straight from the mapping,
  so the bytes are copied once on each side and never pass through a socket;
- CUDA IPC (GPU, each engine on the GPU of an actor rank, as when they are colocated): for each
  sync, every such rank copies the buckets into one buffer on its GPU, laid out as the shared
  memory file is, and the engines on that GPU load from it through a CUDA IPC handle, so the
  bytes never leave the device (NCCL cannot join two processes on one GPU).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import threading
import uuid
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


class Broadcaster:
    """Trainer rank 0's side of the collective transport: buckets are queued and broadcast in
    order by a thread of their own, so a sync returns to the trainers as soon as every bucket is
    copied out. The engines may be busy (asynchronous rollouts queue generations before the load)
    or dead: gloo and NCCL notice a dead peer only at the group's timeout, and a broadcast blocking
    the trainer would also hold the other ZeRO-3 ranks in the next gather. A broken group's thread
    is abandoned (`close`) when the engines join a new one; it ends at the timeout."""

    def __init__(self, group):
        self.group = group
        self.buckets: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="rayrlhf-weight-broadcast", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (flat := self.buckets.get()) is not None:
            try:
                self.group.broadcast(flat, 0).wait()
            except RuntimeError as err:  # a member died or timed out: the group is of no further use
                self.error = err
                return

    def send(self, flat: torch.Tensor) -> None:
        if self.error is not None:
            raise RuntimeError(f"weight sync broadcast failed earlier: {self.error}")
        self.buckets.put(flat)

    def close(self) -> None:
        self.buckets.put(None)


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


def send_buckets(module: torch.nn.Module, plan: list[list[ParamSpec]], is_sender: bool,
                 device: torch.device, broadcaster: Broadcaster | None = None,
                 shared: torch.Tensor | None = None) -> int:
    """Called on every trainer rank (the ZeRO-3 gather needs them all); rank 0 queues each bucket
    on `broadcaster`, or writes it into the `shared` memory file. Returns the bytes sent."""
    weights = {name: (parts, compute) for name, parts, compute in hf_weights(module)}
    sent = 0
    for index, bucket in enumerate(plan):
        entries = [weights[name] for name, _, _ in bucket]
        with gathered([p for parts, _ in entries for p in parts]):
            if not is_sender:
                continue
            if shared is None:
                flat = torch.cat([compute().reshape(-1) for _, compute in entries]).to(device)
                broadcaster.send(flat)
            else:
                flat = bucket_view(shared, plan, index)
                for (_, compute), view in zip(entries, _split(flat, bucket), strict=True):
                    weight = compute()
                    if weight.data_ptr() != view.data_ptr():  # else already there (place_in_shared)
                        view.copy_(weight)
            sent += flat.numel() * flat.element_size()
    return sent


def _split(flat: torch.Tensor, bucket: list[ParamSpec]) -> Iterator[torch.Tensor]:
    """The bucket's tensors, in order, as views of its flat buffer."""
    offset = 0
    for _, shape, _ in bucket:
        n = _numel(shape)
        yield flat[offset:offset + n].view(shape)
        offset += n


def receive_buckets(group, plan: list[list[ParamSpec]], device: torch.device
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) as each bucket arrives, for vLLM's `reload_weights` iterator."""
    for bucket in plan:
        numel = sum(_numel(shape) for _, shape, _ in bucket)
        flat = torch.empty(numel, dtype=getattr(torch, bucket[0][2]), device=device)
        group.broadcast(flat, 0).wait()
        yield from zip([name for name, _, _ in bucket], _split(flat, bucket), strict=True)


# Shared memory: bucket i lives at a 64-byte aligned offset of one file in /dev/shm.

SHARED_DIR = "/dev/shm"
_ALIGN = 64


def _bucket_bytes(bucket: list[ParamSpec]) -> int:
    itemsize = torch.empty((), dtype=getattr(torch, bucket[0][2])).element_size()
    return sum(_numel(shape) for _, shape, _ in bucket) * itemsize


def shared_offsets(plan: list[list[ParamSpec]]) -> list[int]:
    """Each bucket's byte offset in the file, and the file size last."""
    offsets = [0]
    for bucket in plan:
        offsets.append(offsets[-1] + -(-_bucket_bytes(bucket) // _ALIGN) * _ALIGN)
    return offsets


def bucket_view(shared: torch.Tensor, plan: list[list[ParamSpec]], index: int) -> torch.Tensor:
    """Bucket `index` of the mapped file (a uint8 tensor) as a flat tensor of its dtype."""
    start = shared_offsets(plan)[index]
    return shared[start:start + _bucket_bytes(plan[index])].view(getattr(torch, plan[index][0][2]))


def create_shared_file(plan: list[list[ParamSpec]]) -> tuple[str, torch.Tensor] | None:
    """A new file in /dev/shm sized for the plan, mapped here; None if /dev/shm lacks the room
    (a tmpfs that fills up would kill the writer with SIGBUS, not raise)."""
    size = shared_offsets(plan)[-1]
    if not os.path.isdir(SHARED_DIR):
        return None
    stats = os.statvfs(SHARED_DIR)
    if stats.f_bavail * stats.f_frsize < 2 * size:  # leave room for Ray's object store
        return None
    path = os.path.join(SHARED_DIR, f"rayrlhf-weights-{uuid.uuid4().hex}")
    return path, map_shared_file(path, size)


def map_shared_file(path: str, size: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=size, dtype=torch.uint8)


def shared_weights(shared: torch.Tensor, plan: list[list[ParamSpec]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views of every weight in the mapped file, for `reload_weights`."""
    for index, bucket in enumerate(plan):
        yield from zip([name for name, _, _ in bucket], _split(bucket_view(shared, plan, index), bucket),
                       strict=True)


def place_in_shared(module: torch.nn.Module, shared: torch.Tensor, plan: list[list[ParamSpec]]) -> int:
    """Moves each plain weight of the module into its place in the mapped file: the parameter's
    data becomes that view, so the optimizer updates the weights where the engines read them and
    a sync copies nothing on the trainer's side (LoRA-merged weights are still computed and
    copied). Only for parameters nothing else re-lays out: one rank, ZeRO stage 0, fp32 (the
    caller checks). Returns how many parameters moved."""
    plain = {name: parts[0] for name, parts, _ in hf_weights(module) if len(parts) == 1}
    moved = 0
    for name, view in shared_weights(shared, plan):
        param = plain.get(name)
        if param is not None and param.dtype == view.dtype and param.shape == view.shape:
            view.copy_(param.data)
            param.data = view
            moved += 1
    return moved


def cuda_ipc_handle(buffer: torch.Tensor) -> tuple[str, tuple]:
    """What another process on the same GPU needs to map `buffer`: the GPU's UUID (device
    indices differ between processes) and torch's IPC description of the allocation."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(buffer)
    return str(torch.cuda.get_device_properties(buffer.device).uuid), args


def open_cuda_ipc(handle: tuple[str, tuple]) -> torch.Tensor:
    """The buffer of `cuda_ipc_handle`, mapped into this process on the same physical GPU."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuid, args = handle
    local = [i for i in range(torch.cuda.device_count())
             if str(torch.cuda.get_device_properties(i).uuid) == uuid]
    if not local:
        raise RuntimeError(f"weight sync by CUDA IPC: GPU {uuid} is not visible to this engine")
    args = list(args)
    args[6] = local[0]  # reduce_tensor's device index is the sender's
    return rebuild_cuda_tensor(*args)


def ipc_senders(actor_devices: list[tuple], engine_devices: list[tuple]) -> list[int] | None:
    """For each engine, the actor rank on its GPU (its CUDA IPC sender), or None unless every
    engine has one GPU that an actor rank uses. A device is (node id, GPU ids)."""
    ranks = {device: rank for rank, device in reversed(list(enumerate(actor_devices))) if len(device[1]) == 1}
    senders = [ranks.get(device) for device in engine_devices]
    return None if None in senders else senders


# The functions below run inside each vLLM worker through `LLM.collective_rpc`, so that
# with tensor parallelism every worker process joins the group and loads its own shard.

def engine_join(worker, master_addr: str, port: int, first_rank: int, world_size: int,
                backend: str, timeout_s: float) -> None:
    worker.rayrlhf_sync_group = join_group(master_addr, port, first_rank + worker.rank,
                                           world_size, backend, timeout_s)


def engine_map(worker, path: str, plan: list[list[ParamSpec]]) -> None:
    worker.rayrlhf_shared = map_shared_file(path, shared_offsets(plan)[-1])
    worker.rayrlhf_read_in_place = read_packed_weights_in_place(worker, worker.rayrlhf_shared, plan)


def engine_receive(worker, plan: list[list[ParamSpec]], ipc_handle: tuple | None = None) -> None:
    if ipc_handle is not None:
        buffer = open_cuda_ipc(ipc_handle)
        worker.reload_weights(weights_iterator=shared_weights(buffer, plan))
        torch.cuda.synchronize()  # every copy out of the buffer is done before its owner frees it
        return
    shared = getattr(worker, "rayrlhf_shared", None)
    if shared is not None:
        weights = shared_weights(shared, plan)
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        weights = receive_buckets(worker.rayrlhf_sync_group, plan, device)
    if not load_in_place(worker, weights):
        worker.reload_weights(weights_iterator=weights)


# In-place loading on CPU. vLLM's CPU backend packs each linear layer's weight into oneDNN's
# blocked layout and drops the plain tensor, so a new weight can only come in through its
# layer-by-layer reload: every layer's tensors allocated afresh, loaded, re-packed, copied back
# (most of a sync's time). An engine started after `keep_plain_linear_weights` keeps the plain
# weights, so a sync loads into them with the model's own `load_weights` and re-packs each layer
# with vLLM's own packing: the same result, without the allocations and the bookkeeping. With
# the shared-memory file mapped, the plain weights of the packed layers that compute from their
# packed copy alone are views of the file itself (`read_packed_weights_in_place`), so a sync
# re-packs straight from it and loads only the rest.

def keep_plain_linear_weights() -> None:
    """Makes vLLM's CPU linear-layer packing keep each plain weight (call before the engine
    loads its model, in the process that loads it). A vLLM without that function keeps its own
    behaviour, and its reload serves the syncs."""
    from vllm.model_executor.layers import utils

    pack = getattr(utils, "dispatch_cpu_unquantized_gemm", None)
    if pack is None or hasattr(pack, "original"):
        return

    def pack_keeping_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        pack(layer, remove_weight=False)
        # A 3-D (convolution) weight is packed in place, so it cannot be loaded into again.
        layer.rayrlhf_repack = layer.weight.dim() == 2 and not layer.weight.is_meta

    pack_keeping_weight.original = pack
    utils.dispatch_cpu_unquantized_gemm = pack_keeping_weight


def _in_place_packing(worker):
    """vLLM's CPU packing function where a sync can load in place (see `load_in_place`), else None."""
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    pack = getattr(getattr(utils, "dispatch_cpu_unquantized_gemm", None), "original", None)
    modules = list(worker.get_model().modules())
    plain_methods = (type(None), UnquantizedLinearMethod, UnquantizedEmbeddingMethod)
    if (pack is None or worker.model_config.quantization is not None
            or not all(type(getattr(m, "quant_method", None)) in plain_methods for m in modules)
            or not all(getattr(m, "rayrlhf_repack", True) for m in modules)):
        return None
    return pack


def read_packed_weights_in_place(worker, shared: torch.Tensor, plan: list[list[ParamSpec]]) -> set[str]:
    """Makes each packed layer's plain weight a view of its bytes in the mapped file, where the
    file holds them in the engine's layout: one HF weight, or the HF weights vLLM stacks into one
    (q, k, v; gate, up), side by side in that order. Returns the HF names now read in place.

    Only layers that compute from their packed copy alone are given views (see
    `_computes_from_packed_copy`), so what the engine computes never depends on the file: the
    trainer may write it (or its optimizer update it) at any time, and only re-packing, once a
    sync has written the whole file, reads the views."""
    if _in_place_packing(worker) is None:
        return set()
    model = worker.get_model()
    views = dict(shared_weights(shared, plan))
    stacked = getattr(model, "packed_modules_mapping", {})
    looked_up = _looked_up_weights(model)
    read_in_place: set[str] = set()
    for name, layer in model.named_modules():
        if (not getattr(layer, "rayrlhf_repack", False) or id(layer.weight) in looked_up
                or not _computes_from_packed_copy(layer)):
            continue
        prefix, _, leaf = name.rpartition(".")
        hf_names = [f"{prefix}.{part}.weight".lstrip(".") for part in stacked.get(leaf, [leaf])]
        parts = [views.get(hf_name) for hf_name in hf_names]
        if any(part is None or part.dtype != layer.weight.dtype for part in parts):
            continue
        first, rows = parts[0], sum(part.shape[0] for part in parts)
        side_by_side = all(a.data_ptr() + a.numel() * a.element_size() == b.data_ptr()
                           for a, b in zip(parts, parts[1:], strict=False))
        if not side_by_side or (rows, *first.shape[1:]) != tuple(layer.weight.shape):
            continue
        layer.weight.data = first.as_strided((rows, *first.shape[1:]), first.stride())
        read_in_place.update(hf_names)
    return read_in_place


def _looked_up_weights(model: torch.nn.Module) -> set[int]:
    """ids of the weights that embedding lookups read as they are (with tied embeddings, the LM
    head's weight too), never through a packed copy."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    return {id(m.weight) for m in model.modules()
            if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}


@torch.no_grad()
def _computes_from_packed_copy(layer: torch.nn.Module) -> bool:
    """Whether the layer's products depend on its packed copy only, never on the memory of its
    plain weight. A layer whose packing fell back to torch's linear reads the plain weight (vLLM's
    CPU kernels depend on the CPU, dtype and shape), so this is measured, not assumed: the plain
    weight is negated in place (exactly undone) and the layer must give the same non-zero output
    before and after."""
    method = getattr(layer, "quant_method", None)
    if method is None:
        return False
    weight = layer.weight
    x = torch.randn(2, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
    before = method.apply(layer, x)
    weight.neg_()
    try:
        after = method.apply(layer, x)
    finally:
        weight.neg_()
    return bool(before.abs().sum() > 0) and torch.equal(before, after)


def load_in_place(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> bool:
    """Loads `weights` into the kept plain weights (skipping those read in place) and re-packs
    every packed layer. Returns False, having read nothing, where vLLM's reload is needed instead:
    an engine that did not keep its plain weights (GPU engines, or worker processes of their own),
    a quantized model, or layers whose loaded weights vLLM transforms in other ways."""
    pack = _in_place_packing(worker)
    if pack is None:
        return False
    read_in_place = getattr(worker, "rayrlhf_read_in_place", set())
    model = worker.get_model()
    model.load_weights((name, tensor) for name, tensor in weights if name not in read_in_place)
    for layer in model.modules():
        if hasattr(layer, "rayrlhf_repack"):
            pack(layer, remove_weight=False)
    return True
