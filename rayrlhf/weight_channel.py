"""The weight-sync channel: the actor's trainer ranks -> every rollout engine.

It picks the transport where the roles were placed (shared memory where every engine shares actor
rank 0's CPU node, CUDA IPC where every engine shares a GPU with an actor rank, else a gloo or NCCL
group: see weight_sync), sets it up, and runs each sync (`WeightChannel`, in the driver); the
trainer ranks' end of it is `SendingRank`, the engines' is their `receive_weights`.
"""

from __future__ import annotations

import os

import ray
import torch
from tqdm import tqdm

from rayrlhf import weight_sync
from rayrlhf.cluster import RoleClock, RoleGroup, describe_placement, device_of
from rayrlhf.errors import RayRLHFError


class WeightChannel:
    def __init__(self, cfg, actor: RoleGroup, engines: RoleGroup, clock: RoleClock):
        self.cfg, self.actor, self.engines, self.clock = cfg, actor, engines, clock
        # The engines' loads of the last sync; asynchronously, awaited only before the next one writes.
        self.loading: list = []
        self.plan = clock.wait(actor.actors[0].weight_sync_plan.remote(cfg.weight_sync.bucket_mb),
                               "weight sync plan")
        self.connect()

    def connect(self) -> None:
        """Sets the transport up; again after an engine restart, since every engine must take part
        (a collective group cannot take a new member, so all join a new one; all map a new file)."""
        cfg = self.cfg
        self.ipc_senders = self._cuda_ipc_senders() if cfg.actor.gpus_per_rank > 0 else None
        self.shared_memory = self._shared_memory_possible() and self._share_weights()
        self.backend = "nccl" if cfg.actor.gpus_per_rank > 0 else "gloo"
        self.transport = "shared memory" if self.shared_memory else \
            "CUDA IPC" if self.ipc_senders else f"{self.backend} broadcast"
        if self.ipc_senders:
            senders = set(self.ipc_senders)
            self.clock.wait([actor.use_cuda_ipc.remote(rank in senders)
                             for rank, actor in enumerate(self.actor.actors)], "weight sync by CUDA IPC")
        if self.streamed:
            self._join_group()

    @property
    def streamed(self) -> bool:
        """Whether the engines receive as rank 0 sends (a collective group), not from a buffer."""
        return not (self.shared_memory or self.ipc_senders)

    def _join_group(self) -> None:
        """Trainer rank 0 and every engine worker join a collective group of their own."""
        ws, tp = self.cfg.weight_sync, self.cfg.rollout.tensor_parallel_size
        sender = self.actor.actors[0]
        addr, port = self.clock.wait(sender.address.remote(), "weight sync rendezvous")
        world = 1 + len(self.engines.actors) * tp
        refs = [sender.join_weight_sync.remote(addr, port, world, self.backend, ws.timeout_s)]
        refs += self.engines.scatter("join_weight_sync", [
            (addr, port, 1 + i * tp, world, self.backend, ws.timeout_s)
            for i in range(len(self.engines.actors))])
        self.clock.wait(refs, "weight sync group", ws.timeout_s)

    def _placement(self) -> str:
        return describe_placement([self.actor, self.engines])

    def _cuda_ipc_senders(self) -> list[int] | None:
        """For each engine, the actor rank that shares its GPU, when CUDA IPC is to be used."""
        transport = self.cfg.weight_sync.transport
        if transport not in ("auto", "cuda_ipc"):
            return None
        devices = [self.clock.wait([a.__ray_call__.remote(device_of) for a in g.actors], "device query")
                   for g in (self.actor, self.engines)]
        senders = weight_sync.ipc_senders(*devices) if self.cfg.rollout.tensor_parallel_size == 1 else None
        if transport == "cuda_ipc" and senders is None:
            raise RayRLHFError("weight_sync.transport=cuda_ipc needs every rollout engine on one GPU "
                               "(tensor_parallel_size 1) that an actor rank uses too (ray.colocate); they "
                               f"were placed on {self._placement()}")
        return senders

    def _shared_memory_possible(self) -> bool:
        transport = self.cfg.weight_sync.transport
        same_node = set(self.engines.node_ids) == {self.actor.node_ids[0]}
        if transport == "shared_memory" and not same_node:
            raise RayRLHFError("weight_sync.transport=shared_memory needs every rollout engine on actor "
                               f"rank 0's node; they were placed on {self._placement()}")
        return transport in ("auto", "shared_memory") and same_node and self.cfg.actor.gpus_per_rank == 0

    def _share_weights(self) -> bool:
        """The engines map a /dev/shm file that actor rank 0 writes to, once it holds the current
        weights; the file is unlinked at once (the mappings keep it), so no process that dies can
        leave it behind. Asynchronously, the engines load from it while the actor trains on, so
        the parameters cannot live in it (the optimizer would write it under a load)."""
        sender, wait = self.actor.actors[0], self.clock.wait
        place = not self.cfg.trainer.async_rollout
        path = wait(sender.share_weights.remote(self.plan, place), "weight sync shared memory")
        if path is None:
            message = f"{weight_sync.SHARED_DIR} has too little free space for the weights"
            if self.cfg.weight_sync.transport == "shared_memory":
                raise RayRLHFError(f"weight_sync.transport=shared_memory: {message}")
            tqdm.write(f"weight sync: {message}; using the collective transport")
            return False
        try:
            wait(self.actor.call("send_weights", self.plan), "weight sync shared memory")
            wait(self.engines.call("map_shared_weights", path, self.plan), "weight sync shared memory")
        finally:
            wait(sender.unlink_shared_weights.remote(), "weight sync shared memory")
        return True

    def send(self) -> int:
        """One sync: the actor ranks send, the engines are told to load (each once it has finished
        the generations sent before). Synchronously the loads are awaited here; asynchronously
        before the next sync writes again. Returns the bytes sent."""
        self.finish_loading()
        send = {"actor_send_weights": self.actor.call("send_weights", self.plan)}
        timeout_s = self.cfg.weight_sync.timeout_s
        sent = self.clock.wait_roles(send, "weight sync", timeout_s)["actor_send_weights"]
        if self.streamed:  # the engines receive as it is sent
            self.loading = self.engines.call("receive_weights", self.plan)
        else:  # written in full, then read: from the shared file, or from each sender's GPU buffer
            handles = [sent[rank][1] for rank in self.ipc_senders] if self.ipc_senders else \
                [None] * len(self.engines.actors)
            self.loading = self.engines.scatter("receive_weights",
                                                [(self.plan, handle) for handle in handles])
        if not self.cfg.trainer.async_rollout:
            self.finish_loading()
        return max(nbytes for nbytes, _ in sent)

    def finish_loading(self) -> None:
        """Waits for the engines' loads of the last sync, then frees what they loaded from."""
        if not self.loading:
            return
        try:
            self.clock.wait_roles({"rollout_load_weights": self.loading}, "weight sync",
                                  self.cfg.weight_sync.timeout_s)
        finally:
            if self.ipc_senders:
                self.clock.wait(self.actor.call("release_weights_buffer"), "weight sync")
        self.loading = []

    def resend(self) -> None:
        """After engines were restarted: the transport set up anew, and the current weights loaded
        by every engine (a load the dead ones had begun never ends)."""
        self.loading = []
        self.connect()
        self.send()
        self.finish_loading()

    def engines_loading(self) -> list[int]:
        """The engines whose load of the last sync has not finished."""
        _, unfinished = ray.wait(self.loading, num_returns=len(self.loading), timeout=0)
        return [self.loading.index(ref) for ref in unfinished]


class SendingRank:
    """An actor trainer rank's end of the channel, mixed into the trainer worker (whose `module`,
    `device`, `world_size`, `cfg` and `dtype` it uses). Every rank takes part in sending (ZeRO-3
    gathers are collective); rank 0, or with CUDA IPC each rank with an engine on its GPU, sends
    (see weight_sync.Sender)."""

    def __init__(self):
        self.weight_sender = weight_sync.Sender()

    def weight_sync_plan(self, bucket_mb: float) -> list:
        return weight_sync.plan_buckets(weight_sync.parameter_specs(self.module),
                                        int(bucket_mb * 2**20))

    def join_weight_sync(self, master_addr: str, port: int, world_size: int, backend: str,
                         timeout_s: float) -> None:
        """Rank 0 of the collective transport (again after an engine restart: a new group)."""
        self.weight_sender.close()
        group = weight_sync.join_group(master_addr, port, 0, world_size, backend, timeout_s)
        self.weight_sender = weight_sync.CollectiveSender(weight_sync.Broadcaster(group), self.device)

    def share_weights(self, plan, place: bool) -> str | None:
        """Creates and maps the shared-memory file (rank 0); its path, or None without room. With
        `place`, the parameters move into it where nothing else re-lays them out."""
        created = weight_sync.create_shared_file(plan)
        if created is None:
            return None
        self.shared_path, shared = created
        self.weight_sender = weight_sync.SharedMemorySender(shared)
        # With nothing re-laying the parameters out (DeepSpeed flattens them under ZeRO 1-3 and
        # in its bf16/fp16 optimizers), they can live in the file itself: no copy at each sync.
        if place and self.world_size == 1 and self.cfg.zero_stage == 0 and self.dtype == torch.float32:
            weight_sync.place_in_shared(self.module, shared, plan)
        return self.shared_path

    def unlink_shared_weights(self) -> None:
        """Once the engines have mapped the file: the mappings keep it while it is in use."""
        os.unlink(self.shared_path)

    def use_cuda_ipc(self, sender: bool) -> None:
        if sender:
            self.weight_sender = weight_sync.CudaIpcSender(self.device)

    def send_weights(self, plan) -> tuple[int, tuple | None]:
        """Bytes sent, and with CUDA IPC the handle of the buffer this rank wrote (kept until
        release_weights_buffer, after the engines have loaded from it)."""
        return self.weight_sender.send(self.module, plan)

    def release_weights_buffer(self) -> None:
        self.weight_sender.release()
