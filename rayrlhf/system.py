"""Starts the roles as Ray actor groups, wires their rendezvous, and moves batches between them."""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch

from rayrlhf.algorithms import response_mask
from rayrlhf.batch import Batch, build_batch
from rayrlhf.cluster import RoleGroup
from rayrlhf.data import Prompt
from rayrlhf.errors import RayRLHFError
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


def roles_needed(cfg) -> set[str]:
    """The reference is started only for a KL term, the critic only for GAE."""
    roles = {"rollout", "reward", "actor"}
    if cfg.algorithm.kl_coef > 0:
        roles.add("reference")
    if cfg.algorithm.estimator == "gae":
        roles.add("critic")
    return roles


def split_evenly(items: list, parts: int) -> list[list]:
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([list(r) + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32)


class RLHFSystem:
    def __init__(self, cfg, pad_token_id: int):
        self.cfg = cfg
        model_path = cfg.model.path
        self.pad_token_id = pad_token_id
        self.groups: list[RoleGroup] = []
        max_model_len = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        critic_path = cfg.critic.model_path or model_path
        try:
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
                                                 model_path, cfg.model.dtype, ref.micro_batch_size,
                                                 r.temperature))
            rw = cfg.reward
            self.reward = self._group("reward", RewardWorker, rw.num_workers, rw.cpus_per_worker,
                                      rw.gpus_per_worker, lambda i: (rw, cfg.model.dtype))
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

    def _group(self, name, cls, count, cpus, gpus, args) -> RoleGroup:
        ray_cfg = self.cfg.ray
        group = RoleGroup(name, cls, count, cpus, gpus, ray_cfg.threads_per_actor, args,
                          ray_cfg.placement_strategy)
        self.groups.append(group)
        return group

    def _wait(self, refs, what: str, timeout_s: float | None = None):
        """ray.get with a deadline: a role that hangs becomes an error naming the stage."""
        timeout_s = timeout_s or self.cfg.ray.call_timeout_s
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RayRLHFError(f"{what} did not finish within {timeout_s:.0f} s (ray.call_timeout_s or "
                               "weight_sync.timeout_s); the actors' logs are in Ray's log directory"
                               ) from None

    def placement(self) -> str:
        """Where each role runs, for the start-up log."""
        return "; ".join(f"{g.name} x{len(g.actors)} on {', '.join(sorted(set(g.nodes())))}"
                         for g in self.groups)

    def _trainer_group(self, role: str, model_path: str) -> RoleGroup:
        cfg = self.cfg
        role_cfg = cfg[role]
        group = self._group(role, TrainerWorker, role_cfg.num_ranks, role_cfg.cpus_per_rank,
                            role_cfg.gpus_per_rank, lambda rank: (role, rank, role_cfg.num_ranks))
        master_addr, master_port = self._wait(group.actors[0].address.remote(), f"{role} rendezvous")
        self._wait(group.call("setup", master_addr, master_port, model_path, role_cfg, cfg.algorithm,
                              cfg.model.dtype, cfg.rollout.temperature, cfg.rollout.max_new_tokens,
                              cfg.seed), f"{role} set-up")
        return group

    def _join_weight_sync(self) -> None:
        ws, tp = self.cfg.weight_sync, self.cfg.rollout.tensor_parallel_size
        backend = "nccl" if self.cfg.actor.gpus_per_rank > 0 else "gloo"
        sender = self.actor.actors[0]
        self.plan = self._wait(sender.weight_sync_plan.remote(ws.bucket_mb), "weight sync plan")
        addr, port = self._wait(sender.address.remote(), "weight sync rendezvous")
        world = 1 + len(self.rollout.actors) * tp
        refs = [sender.join_weight_sync.remote(addr, port, world, backend, ws.timeout_s)]
        refs += self.rollout.scatter("join_weight_sync", [
            (addr, port, 1 + i * tp, world, backend, ws.timeout_s)
            for i in range(len(self.rollout.actors))])
        self._wait(refs, "weight sync group", ws.timeout_s)

    # Sample

    def generate(self, prompts: list[Prompt], step: int, greedy: bool = False) -> Rollout:
        """Every prompt's `rollout.n` samples (one if greedy), as one batch in the shared layout.

        Sampling is seeded per prompt from (run seed, step, position), so it is reproducible."""
        seeds = [(self.cfg.seed * 1_000_003 + step * 10_007 + i) % 2**31 for i in range(len(prompts))]
        n = len(self.rollout.actors)
        shards = zip(split_evenly([p.token_ids for p in prompts], n), split_evenly(seeds, n), strict=True)
        per_prompt = [s for part in self._wait(self.rollout.scatter(
            "generate", list(shards), greedy=greedy), "generation") for s in part]
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
                       {k: [p.fields.get(k) for p, _ in flat] for k in field_names})

    # Feedback

    def rewards(self, rollout: Rollout) -> dict:
        """The reward workers' output for every sample: scores, reasons for unusable ones, metrics."""
        shards = split_evenly(list(range(len(rollout.prompts))), len(self.reward.actors))
        parts = self._wait(self.reward.scatter("scores", [
            (batch, [rollout.prompts[i] for i in rows], [rollout.responses[i] for i in rows],
             {k: [v[i] for i in rows] for k, v in rollout.fields.items()})
            for batch, rows in zip(rollout.batch.chunks(len(shards)), shards, strict=True)]),
            "reward scoring")
        return {
            "scores": torch.cat([p["scores"] for p in parts]),
            "reasons": {rows[row]: why for rows, p in zip(shards, parts, strict=True)
                        for row, why in p["reasons"].items()},
            "metrics": {k: torch.cat([p["metrics"][k] for p in parts]) for k in parts[0]["metrics"]},
        }

    def model_outputs(self, batch: Batch) -> None:
        """Adds old_logprobs, and ref_logprobs and old_values where those roles exist."""
        def shards(group: RoleGroup) -> list[tuple[Batch]]:
            return [(b,) for b in batch.chunks(len(group.actors))]

        refs = {"old_logprobs": self.actor.scatter("infer", shards(self.actor))}
        if self.reference is not None:
            refs["ref_logprobs"] = self.reference.scatter("logprobs", shards(self.reference))
        if self.critic is not None:
            refs["old_values"] = self.critic.scatter("infer", shards(self.critic))
        for key, group_refs in refs.items():
            batch[key] = torch.cat(self._wait(group_refs, key))

    # Learn

    def train(self, batch: Batch, seed: int, kl_coef: float) -> dict[str, float]:
        """Actor and critic train at once, each rank on its share; returns rank-averaged stats."""
        groups = [g for g in (self.actor, self.critic) if g is not None]
        refs = [g.scatter("train", [(b, seed, kl_coef) for b in batch.chunks(len(g.actors))])
                for g in groups]
        stats: dict[str, float] = {}
        for group_refs in refs:
            per_rank = self._wait(group_refs, "training")
            for key in per_rank[0]:
                stats[key] = sum(r[key] for r in per_rank) / len(per_rank)
        return stats

    def sync_weights(self) -> int:
        """Actor weights -> every engine; returns the bytes broadcast."""
        refs = self.actor.call("send_weights", self.plan) + self.rollout.call("receive_weights", self.plan)
        return self._wait(refs, "weight sync", self.cfg.weight_sync.timeout_s)[0]

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
