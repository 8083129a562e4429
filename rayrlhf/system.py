"""The PPO system: starts the roles as Ray actor groups and runs each phase of a step across them
(the driver calls it in the order of the algorithm: sample, feedback, learn)."""

from __future__ import annotations

import ray
import torch

from rayrlhf.algorithms import Sampling
from rayrlhf.batch import Batch
from rayrlhf.cluster import Colocation, RoleClock, RoleGroup, describe_placement, role_memory, wait
from rayrlhf.rollout import engine_class, response_budget
from rayrlhf.rollout_service import Rollout, RolloutService, split_evenly
from rayrlhf.scorers import ReferenceWorker, RewardWorker
from rayrlhf.trainer import TrainerWorker
from rayrlhf.validation import role_placement, roles_needed


def role_sizes(cfg) -> dict[str, tuple[int, float, float]]:
    """(actors, cpus and gpus per actor) of every role the run starts."""
    r, ref, rw = cfg.rollout, cfg.reference, cfg.reward
    sizes = {"rollout": (r.num_engines, r.cpus_per_engine, r.gpus_per_engine),
             "reference": (ref.num_workers, ref.cpus_per_worker, ref.gpus_per_worker),
             "reward": (rw.num_workers, rw.cpus_per_worker, rw.gpus_per_worker),
             **{role: (cfg[role].num_ranks, cfg[role].cpus_per_rank, cfg[role].gpus_per_rank)
                for role in ("actor", "critic")}}
    return {role: size for role, size in sizes.items() if role in roles_needed(cfg)}


def trainer_group(role: str, role_cfg, model_path: str, train_batch_size: int, cfg, placement=None,
                  **setup_kwargs) -> RoleGroup:
    """`role_cfg.num_ranks` DeepSpeed ranks of `role`, rendezvoused and loaded from `model_path`."""
    ranks = role_cfg.num_ranks
    group = RoleGroup(role, TrainerWorker, ranks, role_cfg.cpus_per_rank, role_cfg.gpus_per_rank,
                      cfg.ray.threads_per_actor, lambda rank: (role, rank, ranks),
                      role_placement(cfg.ray, role), placement)
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
    """The roles of a PPO run: `rollout` (the engines, see RolloutService), `reference`, `reward`,
    `actor` and `critic` (the reference and the critic only where the algorithm needs them)."""

    def __init__(self, cfg, pad_token_id: int):
        self.cfg = cfg
        model_path = cfg.model.path
        self.groups: list[RoleGroup] = []
        self.clock = RoleClock(cfg.ray.call_timeout_s)
        self.colocation: Colocation | None = None
        max_model_len = cfg.data.max_prompt_tokens + response_budget(cfg.rollout)
        try:
            self.colocation = Colocation(cfg.ray.colocate, role_sizes(cfg),
                                         lambda role: role_placement(cfg.ray, role))
            r = cfg.rollout
            engines = self._group("rollout", engine_class(r.engine), r.num_engines, r.cpus_per_engine,
                                  r.gpus_per_engine, lambda i: (model_path, cfg.model.tokenizer, r,
                                                                cfg.model.dtype, cfg.seed + i, max_model_len))
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
                self.critic = self._trainer_group("critic", cfg.critic.model_path or model_path)
            # Actor __init__ errors (a bad model, an engine that cannot start) surface here.
            self.clock.wait([a.__ray_ready__.remote() for g in self.groups for a in g.actors], "start-up")
            self.rollout = RolloutService(cfg, engines, self.actor, self.clock, pad_token_id)
            if cfg.actor.peft.method == "qlora":
                # The policy starts from the 4-bit base, dequantized, not from the weights the engines
                # loaded: they get it before they sample the first batch.
                self.rollout.sync_weights()
        except BaseException:
            self.shutdown()
            raise

    def _group(self, name, cls, count, cpus, gpus, args) -> RoleGroup:
        ray_cfg = self.cfg.ray
        group = RoleGroup(name, cls, count, cpus, gpus, ray_cfg.threads_per_actor, args,
                          role_placement(ray_cfg, name), self.colocation.placement(name))
        self.groups.append(group)
        return group

    def _trainer_group(self, role: str, model_path: str) -> RoleGroup:
        cfg = self.cfg
        algo = cfg.algorithm
        steps = cfg.trainer.total_steps * algo.ppo_epochs * cfg.trainer.prompts_per_step * cfg.rollout.n \
            // algo.train_batch_size
        group = trainer_group(role, cfg[role], model_path, algo.train_batch_size, cfg,
                              self.colocation.placement(role), total_steps=steps, algo_cfg=algo,
                              sampling=Sampling.of(cfg.rollout), norm_len=response_budget(cfg.rollout))
        self.groups.append(group)
        return group

    def placement(self) -> str:
        """Where each role runs, for the start-up log."""
        return describe_placement(self.groups)

    def memory(self) -> dict[str, float]:
        return role_memory(self.groups, self.cfg.ray.call_timeout_s)

    # Feedback

    def rewards(self, rollout: Rollout) -> dict:
        """The reward workers' output for every sample: scores, reasons for unusable ones, metrics."""
        shards = split_evenly(list(range(len(rollout.prompts))), len(self.reward.actors))
        parts = self.clock.wait_roles({"reward_scores": self.reward.scatter("scores", [
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
        elif self.cfg.reference.from_actor_base and self.cfg.algorithm.kl_coef > 0:
            calls["reference_logprobs"] = self.actor.scatter("base_logprobs", shards(self.actor))
        if self.critic is not None:
            calls["critic_infer"] = self.critic.scatter("infer", shards(self.critic))
        keys = {"actor_infer": "old_logprobs", "reference_logprobs": "ref_logprobs",
                "critic_infer": "old_values"}
        outputs = self.clock.wait_roles(calls, "old log-probs, reference log-probs and values")
        for call, parts in outputs.items():
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
        for call, per_rank in self.clock.wait_roles(calls, "training").items():
            for key in per_rank[0][0]:
                stats[key] = sum(r[key] for r, _ in per_rank) / len(per_rank)
            if call == "actor_train" and per_rank[0][1] is not None:
                batch["old_logprobs"] = torch.cat([logprobs for _, logprobs in per_rank])
        return stats

    def describe_actor(self, actor_id: str) -> str:
        """'actor rank 1' for an actor id (hex) of the system's, else the id."""
        for group in self.groups:
            rank = group.find(actor_id)
            if rank is not None:
                return _member(group, rank)
        return f"actor {actor_id}"

    def lost_nodes(self) -> dict[str, list[str]]:
        """The nodes gone from the cluster, each with the actors of the system that were on it."""
        lost: dict[str, list[str]] = {}
        for group in self.groups:
            for node, rank in group.lost():
                lost.setdefault(node, []).append(_member(group, rank))
        return lost

    def save_checkpoint(self, path: str) -> None:
        self.clock.wait(self._each_trainer("save_checkpoint", path), "checkpoint save")

    def load_checkpoint(self, path: str) -> None:
        """Trainer states from `path`, then the engines get the resumed actor weights."""
        self.clock.wait(self._each_trainer("load_checkpoint", path), "checkpoint load")
        self.rollout.sync_weights()

    def _each_trainer(self, method: str, path: str) -> list[ray.ObjectRef]:
        """`method(path/role)` on every rank of the actor and (if any) critic trainers."""
        return [ref for role, g in (("actor", self.actor), ("critic", self.critic)) if g is not None
                for ref in g.call(method, f"{path}/{role}")]

    def save_policy(self, path: str) -> None:
        self.clock.wait(self.actor.call("save", path), "policy save")

    def shutdown(self) -> None:
        for group in reversed(self.groups):
            group.shutdown()
        self.groups = []
        if self.colocation is not None:
            self.colocation.release()


def _member(group: RoleGroup, rank: int) -> str:
    kind = {"actor": "rank", "critic": "rank", "rollout": "engine"}.get(group.name, "worker")
    return f"{group.name} {kind} {rank}"
