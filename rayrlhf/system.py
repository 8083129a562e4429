"""Starts the roles as Ray actor groups, wires their rendezvous, and moves batches between them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import remove_placement_group
from tqdm import tqdm

from rayrlhf import weight_sync
from rayrlhf.algorithms import Sampling, response_mask
from rayrlhf.batch import Batch, build_batch
from rayrlhf.cluster import RoleGroup, bundle, reserve
from rayrlhf.data import Prompt
from rayrlhf.errors import RayRLHFError
from rayrlhf.metrics import process_memory
from rayrlhf.rollout import RolloutWorker
from rayrlhf.scorers import ReferenceWorker, RewardWorker
from rayrlhf.trainer import TrainerWorker


@dataclass
class Rollout:
    batch: Batch
    prompts: list[str]
    responses: list[str]
    # The prompts' dataset columns, one list per column, one entry per sample.
    fields: dict[str, list]
    # The prompts it was generated from, one entry per prompt.
    source: list[Prompt]
    # The weight version (syncs before it) of the oldest weights any of its samples came from.
    version: int = 0


@dataclass
class PendingGeneration:
    """A generation sent to the engines: shard i goes to engine i. A shard lost with its engine
    (refs[i] None) is sent again, to the restarted engine, with the weights of that time."""
    prompts: list[Prompt]
    shards: list[tuple]
    greedy: bool
    refs: list
    versions: list[int]


def roles_needed(cfg) -> set[str]:
    """The reference is started only for a KL term, the critic only for GAE."""
    roles = {"rollout", "reward", "actor"}
    if cfg.algorithm.kl_coef > 0:
        roles.add("reference")
    if cfg.algorithm.estimator == "gae":
        roles.add("critic")
    return roles


def role_sizes(cfg) -> dict[str, tuple[int, float, float]]:
    """(actors, cpus and gpus per actor) of every role the run starts."""
    r, ref, rw = cfg.rollout, cfg.reference, cfg.reward
    sizes = {"rollout": (r.num_engines, r.cpus_per_engine, r.gpus_per_engine),
             "reference": (ref.num_workers, ref.cpus_per_worker, ref.gpus_per_worker),
             "reward": (rw.num_workers, rw.cpus_per_worker, rw.gpus_per_worker),
             **{role: (cfg[role].num_ranks, cfg[role].cpus_per_rank, cfg[role].gpus_per_rank)
                for role in ("actor", "critic")}}
    return {role: size for role, size in sizes.items() if role in roles_needed(cfg)}


def split_evenly(items: list, parts: int) -> list[list]:
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([list(r) + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32)


def wait(refs, what: str, timeout_s: float, on_ready=None):
    """ray.get with a deadline, failing fast: a role that hangs becomes an error naming the stage,
    and the first call that fails (its actor died, say) raises at once instead of after the
    others, which may be waiting on it in a collective. `on_ready(ref)` hears of each result."""
    pending = list(refs) if isinstance(refs, list) else [refs]
    deadline = time.monotonic() + timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RayRLHFError(f"{what} did not finish within {timeout_s:.0f} s (ray.call_timeout_s or "
                               "weight_sync.timeout_s); the actors' logs are in Ray's log directory")
        ray.get(ready)
        if on_ready is not None:
            on_ready(ready[0])
    return ray.get(refs)


def role_memory(groups: list[RoleGroup], timeout_s: float) -> dict[str, float]:
    """memory/<role>_rss_gib (and _cuda_peak_gib on GPU): the largest over the role's actors. An
    actor that died since its last call is left out: the next call to it handles its loss."""
    refs = {g.name: [a.__ray_call__.remote(_actor_memory) for a in g.actors] for g in groups}
    ray.wait([ref for group_refs in refs.values() for ref in group_refs],
             num_returns=sum(map(len, refs.values())), timeout=timeout_s)
    out: dict[str, float] = {}
    for name, group_refs in refs.items():
        for ref in group_refs:
            try:
                stats = ray.get(ref, timeout=0)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue
            for key, value in stats.items():
                out[f"memory/{name}_{key}"] = max(out.get(f"memory/{name}_{key}", 0.0), value)
    return out


def _actor_memory(actor) -> dict[str, float]:
    return process_memory()


def _device(actor) -> tuple[str, tuple[str, ...]]:
    """(node id, GPU ids) of the actor: equal for actors that share a GPU."""
    return ray.get_runtime_context().get_node_id(), tuple(str(gpu) for gpu in ray.get_gpu_ids())


def trainer_group(role: str, role_cfg, model_path: str, train_batch_size: int, cfg, placement=None,
                  **setup_kwargs) -> RoleGroup:
    """`role_cfg.num_ranks` DeepSpeed ranks of `role`, rendezvoused and loaded from `model_path`."""
    ranks = role_cfg.num_ranks
    group = RoleGroup(role, TrainerWorker, ranks, role_cfg.cpus_per_rank, role_cfg.gpus_per_rank,
                      cfg.ray.threads_per_actor, lambda rank: (role, rank, ranks), cfg.ray.placement_strategy,
                      placement)
    timeout_s = cfg.ray.call_timeout_s
    try:
        master_addr, master_port = wait(group.actors[0].address.remote(), f"{role} rendezvous", timeout_s)
        wait(group.call("setup", master_addr, master_port, model_path, role_cfg, train_batch_size,
                        cfg.model, cfg.seed, **setup_kwargs), f"{role} set-up", timeout_s)
    except BaseException:
        group.shutdown()
        raise
    return group


class RLHFSystem:
    def __init__(self, cfg, pad_token_id: int):
        self.cfg = cfg
        model_path = cfg.model.path
        self.pad_token_id = pad_token_id
        self.groups: list[RoleGroup] = []
        self.engine_restarts = 0
        # Weight syncs so far; the generations the engines have not finished (oldest first); and,
        # asynchronously, the engines' loads of the last sync, awaited before the next one writes.
        self.weight_version = 0
        self.in_flight: list[PendingGeneration] = []
        self.loading: list = []
        self.role_seconds: dict[str, float] = {}
        # Colocated roles: actor i of each sits on bundle i of one placement group they share.
        self.shared: dict[str, object] = {}
        self.shared_placements = []
        max_model_len = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        critic_path = cfg.critic.model_path or model_path
        try:
            self._reserve_colocated()
            r = cfg.rollout
            self.rollout = self._group("rollout", RolloutWorker, r.num_engines, r.cpus_per_engine,
                                       r.gpus_per_engine, lambda i: (
                                           model_path, cfg.model.tokenizer, r, cfg.model.dtype,
                                           cfg.seed + i, max_model_len))
            roles = roles_needed(cfg)
            self.reference = None
            if "reference" in roles:
                ref = cfg.reference
                self.reference = self._group("reference", ReferenceWorker, ref.num_workers,
                                             ref.cpus_per_worker, ref.gpus_per_worker, lambda i: (
                                                 model_path, cfg.model, ref.micro_batch_size,
                                                 Sampling.of(r)))
            rw = cfg.reward
            self.reward = self._group("reward", RewardWorker, rw.num_workers, rw.cpus_per_worker,
                                      rw.gpus_per_worker, lambda i: (rw, cfg.model, cfg.data.chat_template))
            self.actor = self._trainer_group("actor", model_path)
            self.critic = None
            if "critic" in roles:
                self.critic = self._trainer_group("critic", critic_path)
            # Actor __init__ errors (a bad model, an engine that cannot start) surface here.
            self._wait([a.__ray_ready__.remote() for g in self.groups for a in g.actors], "start-up")
            self._join_weight_sync()
        except BaseException:
            self.shutdown()
            raise

    def _reserve_colocated(self) -> None:
        sizes = role_sizes(self.cfg)
        for members in self.cfg.ray.colocate:
            present = [role for role in members if role in sizes]
            if len(present) < 2:
                continue
            count = max(sizes[role][0] for role in present)
            bundles = [bundle(sum(sizes[role][1] for role in present if sizes[role][0] > i),
                              sum(sizes[role][2] for role in present if sizes[role][0] > i))
                       for i in range(count)]
            placement = reserve(f"colocated roles {'+'.join(present)}", bundles,
                                self.cfg.ray.placement_strategy)
            self.shared_placements.append(placement)
            self.shared |= dict.fromkeys(present, placement)

    def _group(self, name, cls, count, cpus, gpus, args) -> RoleGroup:
        ray_cfg = self.cfg.ray
        group = RoleGroup(name, cls, count, cpus, gpus, ray_cfg.threads_per_actor, args,
                          ray_cfg.placement_strategy, self.shared.get(name))
        self.groups.append(group)
        return group

    def _wait(self, refs, what: str, timeout_s: float | None = None):
        return wait(refs, what, timeout_s or self.cfg.ray.call_timeout_s)

    def _wait_roles(self, calls: dict[str, list], what: str, timeout_s: float | None = None
                    ) -> dict[str, list]:
        """The results of calls sent to several roles at once; adds to role_seconds[name] the time
        from now until the last of that role's calls finished."""
        start, owner = time.perf_counter(), {ref: name for name, refs in calls.items() for ref in refs}
        left = {name: len(refs) for name, refs in calls.items()}

        def finished(ref) -> None:
            left[owner[ref]] -= 1
            if not left[owner[ref]]:
                self.role_seconds[owner[ref]] = self.role_seconds.get(owner[ref], 0.0) + \
                    time.perf_counter() - start

        wait(list(owner), what, timeout_s or self.cfg.ray.call_timeout_s, on_ready=finished)
        return {name: ray.get(refs) for name, refs in calls.items()}

    def take_role_seconds(self) -> dict[str, float]:
        """time/role/<role>_<call> since the last call: how long each role's work took."""
        seconds, self.role_seconds = self.role_seconds, {}
        return {f"time/role/{name}": value for name, value in seconds.items()}

    def memory(self) -> dict[str, float]:
        return role_memory(self.groups, self.cfg.ray.call_timeout_s)

    def placement(self) -> str:
        """Where each role runs, for the start-up log."""
        def shares(group: RoleGroup) -> str:
            others = [g.name for g in self.groups if g is not group and g.placement is group.placement]
            return f" (bundles shared with {', '.join(others)})" if others else ""

        return "; ".join(f"{g.name} x{len(g.actors)} on {', '.join(sorted(set(g.nodes())))}{shares(g)}"
                         for g in self.groups)

    def _trainer_group(self, role: str, model_path: str) -> RoleGroup:
        cfg = self.cfg
        algo = cfg.algorithm
        steps = cfg.trainer.total_steps * algo.ppo_epochs * cfg.trainer.prompts_per_step * cfg.rollout.n \
            // algo.train_batch_size
        group = trainer_group(role, cfg[role], model_path, algo.train_batch_size, cfg,
                              self.shared.get(role), total_steps=steps, algo_cfg=algo,
                              sampling=Sampling.of(cfg.rollout), norm_len=cfg.rollout.max_new_tokens)
        self.groups.append(group)
        return group

    def _join_weight_sync(self) -> None:
        """Plans the buckets and sets up the transport (see weight_sync); every engine takes part."""
        ws, tp = self.cfg.weight_sync, self.cfg.rollout.tensor_parallel_size
        sender = self.actor.actors[0]
        self.plan = self._wait(sender.weight_sync_plan.remote(ws.bucket_mb), "weight sync plan")
        self.ipc_senders = self._cuda_ipc_senders() if self.cfg.actor.gpus_per_rank > 0 else None
        self.shared_memory = self._shared_memory_possible() and self._share_weights(sender)
        backend = "nccl" if self.cfg.actor.gpus_per_rank > 0 else "gloo"
        self.weight_transport = "shared memory" if self.shared_memory else \
            "CUDA IPC" if self.ipc_senders else f"{backend} broadcast"
        if self.ipc_senders:
            senders = set(self.ipc_senders)
            self._wait([a.use_cuda_ipc.remote(rank in senders) for rank, a in enumerate(self.actor.actors)],
                       "weight sync by CUDA IPC")
        if self.shared_memory or self.ipc_senders:
            return
        addr, port = self._wait(sender.address.remote(), "weight sync rendezvous")
        world = 1 + len(self.rollout.actors) * tp
        refs = [sender.join_weight_sync.remote(addr, port, world, backend, ws.timeout_s)]
        refs += self.rollout.scatter("join_weight_sync", [
            (addr, port, 1 + i * tp, world, backend, ws.timeout_s)
            for i in range(len(self.rollout.actors))])
        self._wait(refs, "weight sync group", ws.timeout_s)

    def _cuda_ipc_senders(self) -> list[int] | None:
        """For each engine, the actor rank that shares its GPU, when CUDA IPC is to be used."""
        transport = self.cfg.weight_sync.transport
        if transport not in ("auto", "cuda_ipc"):
            return None
        devices = [self._wait([a.__ray_call__.remote(_device) for a in g.actors], "device query")
                   for g in (self.actor, self.rollout)]
        senders = weight_sync.ipc_senders(*devices) if self.cfg.rollout.tensor_parallel_size == 1 else None
        if transport == "cuda_ipc" and senders is None:
            raise RayRLHFError("weight_sync.transport=cuda_ipc needs every rollout engine on one GPU "
                               "(tensor_parallel_size 1) that an actor rank uses too (ray.colocate); they "
                               f"were placed on {self.placement()}")
        return senders

    def _shared_memory_possible(self) -> bool:
        transport = self.cfg.weight_sync.transport
        same_node = set(self.rollout.nodes()) == {self.actor.nodes()[0]}
        if transport == "shared_memory" and not same_node:
            raise RayRLHFError("weight_sync.transport=shared_memory needs every rollout engine on actor "
                               f"rank 0's node; they were placed on {self.placement()}")
        return transport in ("auto", "shared_memory") and same_node and self.cfg.actor.gpus_per_rank == 0

    def _share_weights(self, sender) -> bool:
        """The engines map a /dev/shm file that actor rank 0 writes to, once it holds the current
        weights; the file is unlinked at once (the mappings keep it), so no process that dies can
        leave it behind. Asynchronously, the engines load from it while the actor trains on, so
        the parameters cannot live in it (the optimizer would write it under a load)."""
        place = not self.cfg.trainer.async_rollout
        path = self._wait(sender.share_weights.remote(self.plan, place), "weight sync shared memory")
        if path is None:
            message = f"{weight_sync.SHARED_DIR} has too little free space for the weights"
            if self.cfg.weight_sync.transport == "shared_memory":
                raise RayRLHFError(f"weight_sync.transport=shared_memory: {message}")
            tqdm.write(f"weight sync: {message}; using the collective transport")
            return False
        try:
            self._wait(self.actor.call("send_weights", self.plan), "weight sync shared memory")
            self._wait(self.rollout.call("map_shared_weights", path, self.plan), "weight sync shared memory")
        finally:
            self._wait(sender.unlink_shared_weights.remote(), "weight sync shared memory")
        return True

    # Sample

    def generate(self, prompts: list[Prompt], step: int, greedy: bool = False) -> Rollout:
        """Every prompt's `rollout.n` samples (one if greedy), as one batch in the shared layout."""
        return self.finish_generation(self.start_generation(prompts, step, greedy))

    def start_generation(self, prompts: list[Prompt], step: int, greedy: bool = False) -> PendingGeneration:
        """Sends the prompts to the engines and returns at once (the engines run their calls in
        order, so a weight sync sent later waits for this generation).

        Sampling is seeded per prompt from (run seed, step, position), so it is reproducible."""
        seeds = [(self.cfg.seed * 1_000_003 + step * 10_007 + i) % 2**31 for i in range(len(prompts))]
        n = len(self.rollout.actors)
        shards = list(zip(split_evenly([p.token_ids for p in prompts], n), split_evenly(seeds, n),
                          strict=True))
        refs = self.rollout.scatter("generate", shards, greedy=greedy)
        pending = PendingGeneration(prompts, shards, greedy, refs, [self.weight_version] * n)
        self.in_flight.append(pending)
        return pending

    def finish_generation(self, pending: PendingGeneration) -> Rollout:
        def collect():
            for rank, ref in enumerate(pending.refs):
                if ref is None:  # lost with its engine: to the restarted one, with today's weights
                    pending.refs[rank] = self.rollout.actors[rank].generate.remote(
                        *pending.shards[rank], greedy=pending.greedy)
                    pending.versions[rank] = self.weight_version
            return self._wait_roles({"rollout_generate": pending.refs}, "generation")["rollout_generate"]

        parts = self._with_engines(collect)
        self.in_flight.remove(pending)
        prompts = pending.prompts
        per_prompt = [s for part in parts for s in part]
        flat = [(prompt, sample) for prompt, samples in zip(prompts, per_prompt, strict=True)
                for sample in samples]
        batch = build_batch([p.token_ids for p, _ in flat], [s.response_ids for _, s in flat],
                            self.pad_token_id)
        width = batch["sequences"].shape[1] - batch.prompt_len
        batch["mask"] = response_mask(batch["sequences"][:, batch.prompt_len:], batch["response_lengths"])
        batch["engine_logprobs"] = pad_rows([s.logprobs for _, s in flat], width)
        batch["truncated"] = torch.tensor([not s.finished for _, s in flat], dtype=torch.float32)
        field_names = flat[0][0].fields.keys()
        return Rollout(batch, [p.text for p, _ in flat], [s.text for _, s in flat],
                       {k: [p.fields.get(k) for p, _ in flat] for k in field_names}, prompts,
                       min(pending.versions))

    def generations_in_progress(self) -> int:
        """Generations sent to the engines that they have not finished yet (or lost with an engine)."""
        def unfinished(pending: PendingGeneration) -> bool:
            sent = [ref for ref in pending.refs if ref is not None]
            return len(sent) < len(pending.refs) or bool(ray.wait(sent, num_returns=len(sent), timeout=0)[1])

        return sum(map(unfinished, self.in_flight))

    # Feedback

    def rewards(self, rollout: Rollout) -> dict:
        """The reward workers' output for every sample: scores, reasons for unusable ones, metrics."""
        shards = split_evenly(list(range(len(rollout.prompts))), len(self.reward.actors))
        parts = self._wait_roles({"reward_scores": self.reward.scatter("scores", [
            (batch, [rollout.prompts[i] for i in rows], [rollout.responses[i] for i in rows],
             {k: [v[i] for i in rows] for k, v in rollout.fields.items()})
            for batch, rows in zip(rollout.batch.chunks(len(shards)), shards, strict=True)])},
            "reward scoring")["reward_scores"]
        return {
            "scores": torch.cat([p["scores"] for p in parts]),
            "reasons": {rows[row]: why for rows, p in zip(shards, parts, strict=True)
                        for row, why in p["reasons"].items()},
            "metrics": {k: torch.cat([p["metrics"][k] for p in parts]) for k in parts[0]["metrics"]},
        }

    def model_outputs(self, batch: Batch, old_logprobs: bool = True) -> None:
        """Adds old_logprobs (if asked), and ref_logprobs and old_values where those roles exist."""
        def shards(group: RoleGroup) -> list[tuple[Batch]]:
            return [(b,) for b in batch.chunks(len(group.actors))]

        calls = {"actor_infer": self.actor.scatter("infer", shards(self.actor))} if old_logprobs else {}
        if self.reference is not None:
            calls["reference_logprobs"] = self.reference.scatter("logprobs", shards(self.reference))
        if self.critic is not None:
            calls["critic_infer"] = self.critic.scatter("infer", shards(self.critic))
        keys = {"actor_infer": "old_logprobs", "reference_logprobs": "ref_logprobs",
                "critic_infer": "old_values"}
        for call, parts in self._wait_roles(calls, "old log-probs, reference log-probs and values").items():
            batch[keys[call]] = torch.cat(parts)

    # Learn

    def train(self, batch: Batch, seed: int, kl_coef: float) -> dict[str, float]:
        """Actor and critic train at once, each rank on its share; returns rank-averaged stats.
        A batch without old_logprobs gets those of the actor's training forward."""
        groups = [g for g in (self.actor, self.critic) if g is not None]
        calls = {f"{g.name}_train": g.scatter("train", [(b, seed, kl_coef)
                                                        for b in batch.chunks(len(g.actors))])
                 for g in groups}
        stats: dict[str, float] = {}
        for call, per_rank in self._wait_roles(calls, "training").items():
            for key in per_rank[0][0]:
                stats[key] = sum(r[key] for r, _ in per_rank) / len(per_rank)
            if call == "actor_train" and per_rank[0][1] is not None:
                batch["old_logprobs"] = torch.cat([logprobs for _, logprobs in per_rank])
        return stats

    def sync_weights(self) -> int:
        """Actor weights -> every engine; returns the bytes sent. Each engine loads them once it has
        finished the generations sent before, so every generation sent from now on samples with them.
        Synchronously that is at once. Asynchronously the engines may still have generations queued:
        their loads are awaited only before the next sync writes again, so the trainers go on."""
        sent = self._with_engines(self._broadcast_weights)
        self.weight_version += 1
        return sent

    def _broadcast_weights(self) -> int:
        self._finish_loading()
        send = {"actor_send_weights": self.actor.call("send_weights", self.plan)}
        timeout_s = self.cfg.weight_sync.timeout_s
        if not (self.shared_memory or self.ipc_senders):  # streamed: the engines receive as it is sent
            sent = self._wait_roles(send, "weight sync", timeout_s)["actor_send_weights"]
            self.loading = self.rollout.call("receive_weights", self.plan)
        else:  # written in full, then read: from the shared file, or from each sender's GPU buffer
            sent = self._wait_roles(send, "weight sync", timeout_s)["actor_send_weights"]
            handles = [sent[rank][1] for rank in self.ipc_senders] if self.ipc_senders else \
                [None] * len(self.rollout.actors)
            self.loading = self.rollout.scatter("receive_weights",
                                                [(self.plan, handle) for handle in handles])
        if not self.cfg.trainer.async_rollout:
            self._finish_loading()
        return max(nbytes for nbytes, _ in sent)

    def _finish_loading(self) -> None:
        """Waits for the engines' loads of the last sync, then frees what they loaded from."""
        if not self.loading:
            return
        try:
            self._wait_roles({"rollout_load_weights": self.loading}, "weight sync",
                             self.cfg.weight_sync.timeout_s)
        finally:
            if self.ipc_senders:
                self._wait(self.actor.call("release_weights_buffer"), "weight sync")
        self.loading = []

    def release_engines(self) -> None:
        """With rollout.sleep, the engines free their GPU memory until the next weight sync."""
        if self.cfg.rollout.sleep:
            self._with_engines(lambda: self._wait_roles({"rollout_sleep": self.rollout.call("sleep")},
                                                        "engine sleep"))

    def _with_engines(self, call):
        """call(), which uses the engines. An engine that died (killed, out of memory) is started
        again on its bundle and given the current weights, and call() is tried again, up to
        rollout.max_restarts engine restarts in the run. With the collective transport, the engines
        still inside a load when one died are restarted too: the broadcast they wait in cannot end.
        The generations the dead engines had queued are sent again (see finish_generation)."""
        while True:
            try:
                return call()
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                dead = self._dead_engines()
                if not dead:
                    raise
                if not (self.shared_memory or self.ipc_senders):
                    _, loading = ray.wait(self.loading, num_returns=len(self.loading), timeout=0)
                    dead = sorted(set(dead) | {self.loading.index(ref) for ref in loading})
                self.engine_restarts += len(dead)
                limit = self.cfg.rollout.max_restarts
                if self.engine_restarts > limit:
                    raise RayRLHFError(f"rollout engine(s) {dead} died and the run has used its "
                                       f"rollout.max_restarts={limit} engine restarts") from err
                tqdm.write(f"rollout engine(s) {dead} died; restarting them with the current weights "
                           f"({self.engine_restarts} of rollout.max_restarts={limit} restarts used)")
                for rank in dead:
                    self.rollout.restart(rank)
                    for pending in self.in_flight:
                        pending.refs[rank] = None
                self.loading = []
                self._wait([a.__ray_ready__.remote() for a in self.rollout.actors], "engine restart")
                self._join_weight_sync()  # a group cannot take a new member: every member joins anew
                self._broadcast_weights()
                self._finish_loading()

    def _dead_engines(self) -> list[int]:
        """Engines whose process is gone: their liveness probe fails at once, while a live engine's
        waits behind the call it is busy with."""
        probes = [engine.__ray_ready__.remote() for engine in self.rollout.actors]
        ray.wait(probes, num_returns=len(probes), timeout=5)
        dead = []
        for rank, probe in enumerate(probes):
            try:
                ray.get(probe, timeout=0)
            except ray.exceptions.RayActorError:
                dead.append(rank)
            except ray.exceptions.GetTimeoutError:
                pass  # alive, busy
        return dead

    def describe_actor(self, actor_id: str) -> str:
        """'actor rank 1' for an actor id (hex) of the system's, else the id."""
        for group in self.groups:
            rank = group.find(actor_id)
            if rank is not None:
                return f"{group.name} {'rank' if group.name in ('actor', 'critic') else 'worker'} {rank}"
        return f"actor {actor_id}"

    def save_checkpoint(self, path: str) -> None:
        self._wait(self._each_trainer("save_checkpoint", path), "checkpoint save")

    def load_checkpoint(self, path: str) -> None:
        """Trainer states from `path`, then the engines get the resumed actor weights."""
        self._wait(self._each_trainer("load_checkpoint", path), "checkpoint load")
        self.sync_weights()

    def _each_trainer(self, method: str, path: str) -> list[ray.ObjectRef]:
        """`method(path/role)` on every rank of the actor and (if any) critic trainers."""
        return [ref for role, g in (("actor", self.actor), ("critic", self.critic)) if g is not None
                for ref in g.call(method, f"{path}/{role}")]

    def save_policy(self, path: str) -> None:
        self._wait(self.actor.call("save", path), "policy save")

    def shutdown(self) -> None:
        for group in reversed(self.groups):
            group.shutdown()
        self.groups = []
        for placement in self.shared_placements:
            remove_placement_group(placement)
        self.shared_placements = []
