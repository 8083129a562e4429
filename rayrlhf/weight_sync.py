"""The weight-sync channel's transports: actor trainer rank 0 (or, by CUDA IPC, the rank on an
engine's GPU) -> every rollout engine worker.

Weights travel as flat buckets of about `bucket_mb` (`plan_buckets`). Each transport is a
`Sender` on the trainer ranks and a `Receiver` in the engine workers, which turns the buckets
back into named HF tensors for the engine to load (vllm_engine: on CPU in place, elsewhere
through vLLM's reload):
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
Nothing here knows an engine's internals; `rayrlhf.weight_channel` picks the transport and runs
the syncs.
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

from rayrlhf.adapters import dense_spec, hf_weights

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
    """The plain HF weights (adapters merged) with their full shapes and dtypes."""
    return [(name, shape, str(dtype).removeprefix("torch."))
            for name, (p, *_), _ in hf_weights(module) for shape, dtype in [dense_spec(p)]]


def gathered(params: list[torch.nn.Parameter]):
    """Full tensors for the duration of the block; a collective under ZeRO-3, a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def send_buckets(module: torch.nn.Module, plan: list[list[ParamSpec]], write=None) -> int:
    """Called on every trainer rank (the ZeRO-3 gather needs them all); on the rank that sends,
    `write(index, weights)` puts bucket `index` (its weights, as functions computing each) where
    the engines read it and returns its bytes. Returns the bytes sent."""
    weights = {name: (parts, compute) for name, parts, compute in hf_weights(module)}
    sent = 0
    for index, bucket in enumerate(plan):
        entries = [weights[name] for name, _, _ in bucket]
        with gathered([p for parts, _ in entries for p in parts]):
            if write is not None:
                sent += write(index, [compute for _, compute in entries])
    return sent


class Sender:
    """A trainer rank's side of the weight transport. This base takes part in the gathers only
    (the ranks that send nothing); each transport's sender writes the buckets somewhere."""

    def send(self, module: torch.nn.Module, plan: list[list[ParamSpec]]) -> tuple[int, tuple | None]:
        """Bytes sent, and with CUDA IPC the handle of the buffer written."""
        return send_buckets(module, plan), None

    def release(self) -> None:
        """The engines have loaded the last sync."""

    def close(self) -> None:
        """The transport is replaced (the engines join anew after a restart)."""


class CollectiveSender(Sender):
    """Rank 0 of the collective transport: each bucket is queued on the broadcaster's thread."""

    def __init__(self, broadcaster: Broadcaster, device: torch.device):
        self.broadcaster, self.device = broadcaster, device

    def send(self, module, plan) -> tuple[int, tuple | None]:
        def write(index: int, weights) -> int:
            flat = torch.cat([compute().reshape(-1) for compute in weights]).to(self.device)
            self.broadcaster.send(flat)
            return flat.numel() * flat.element_size()

        return send_buckets(module, plan, write), None

    def close(self) -> None:
        self.broadcaster.close()


class BufferSender(Sender):
    """Writes every bucket into `buffer` (a uint8 tensor in the shared file's layout)."""

    def __init__(self, buffer: torch.Tensor | None = None):
        self.buffer = buffer

    def send(self, module, plan) -> tuple[int, tuple | None]:
        return send_buckets(module, plan, self._write_into(plan)), None

    def _write_into(self, plan):
        def write(index: int, weights) -> int:
            flat = bucket_view(self.buffer, plan, index)
            for compute, view in zip(weights, _split(flat, plan[index]), strict=True):
                weight = compute()
                if weight.data_ptr() != view.data_ptr():  # else already there (place_in_shared)
                    view.copy_(weight)
            return flat.numel() * flat.element_size()

        return write


class SharedMemorySender(BufferSender):
    """Rank 0 of the shared-memory transport: the buffer is the /dev/shm file the engines map."""


class CudaIpcSender(BufferSender):
    """A rank with an engine on its GPU: each sync's buckets go into a buffer on that GPU, kept
    until the engines have loaded from it, and the engines get its CUDA IPC handle."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def send(self, module, plan) -> tuple[int, tuple | None]:
        self.buffer = torch.empty(shared_offsets(plan)[-1], dtype=torch.uint8, device=self.device)
        sent = send_buckets(module, plan, self._write_into(plan))
        torch.cuda.synchronize(self.device)
        return sent, cuda_ipc_handle(self.buffer)

    def release(self) -> None:
        self.buffer = None


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




# The engine side of each transport: where a sync's (name, tensor) pairs come from. The engine
# loads them as its own kind requires (see vllm_engine).

class Receiver:
    def weights(self, plan: list[list[ParamSpec]]) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def loaded(self) -> None:
        """The engine has loaded what `weights` gave."""


class CollectiveReceiver(Receiver):
    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device

    def weights(self, plan):
        return receive_buckets(self.group, plan, self.device)


class BufferReceiver(Receiver):
    """Views of a buffer in the shared file's layout: the mapped /dev/shm file, or a GPU buffer."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer

    def weights(self, plan):
        return shared_weights(self.buffer, plan)


class CudaIpcReceiver(BufferReceiver):
    def __init__(self, handle: tuple[str, tuple]):
        super().__init__(open_cuda_ipc(handle))

    def loaded(self) -> None:
        torch.cuda.synchronize()  # every copy out of the buffer is done before its owner frees it
