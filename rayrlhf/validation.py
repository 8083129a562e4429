"""What a config must satisfy beyond its types: the rule of each field (declared beside the field
in the schema, `rule(...)`), in the sections the stage uses and for the roles it starts, and, in
one place below, the rules that tie fields together. `validate` raises a ConfigError naming the key.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields, is_dataclass

from omegaconf import MISSING, DictConfig, OmegaConf

from rayrlhf.algorithms import GROUP_ESTIMATORS
from rayrlhf.errors import RayRLHFError
from rayrlhf.rollout import response_budget


class ConfigError(RayRLHFError):
    """A config that cannot run; the message names the key and the reason."""


STAGES = ("sft", "rm", "ppo", "dpo")
SUPERVISED_STAGES = ("sft", "rm", "dpo")
PPO_ROLES = ("rollout", "reference", "reward", "actor", "critic")
WEIGHT_TRANSPORTS = ("auto", "shared_memory", "cuda_ipc", "collective")
LR_SCHEDULES = ("constant", "linear", "cosine")
# Parameter-efficient methods (rayrlhf/adapters.py, all through peft). The first four change the
# linear layers and merge into plain weights (the engines, saved models and next stages get those);
# the soft prompts learn virtual tokens, which a plain model has no place for.
MERGEABLE_PEFT = ("lora", "qlora", "adalora", "ia3")
SOFT_PROMPT_PEFT = ("prompt", "ptuning", "prefix", "ptuning_v2")
PEFT_METHODS = ("none", *MERGEABLE_PEFT, *SOFT_PROMPT_PEFT)


@dataclass(frozen=True)
class Rule:
    """What a field's value must be: within bounds (ge/gt, le/lt), one of some choices, or (for a
    list) every item >= each_ge. An unset optional field (None) passes; `why` goes into the message."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    one_of: tuple | None = None
    each_ge: float | None = None
    why: str = ""

    def problem(self, value) -> str | None:
        """Why `value` breaks the rule, or None."""
        why = f" ({self.why})" if self.why else ""
        if value is None:
            return None
        if self.one_of is not None:
            got = f"'{value}'" if isinstance(value, str) else value
            return None if value in self.one_of else \
                f"must be one of {', '.join(map(str, self.one_of))}{why}; got {got}"
        if self.each_ge is not None:
            return None if all(v >= self.each_ge for v in value) else \
                f"must hold values >= {self.each_ge}{why}, got {list(value)}"
        if ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)):
            return None
        return f"must be {self._bounds()}{why}, got {value}"

    def _bounds(self) -> str:
        low = f">= {self.ge}" if self.ge is not None else f"> {self.gt}" if self.gt is not None else ""
        high = f"<= {self.le}" if self.le is not None else f"< {self.lt}" if self.lt is not None else ""
        if low and high:
            return f"in {'[' if self.ge is not None else '('}{low.split()[1]}, {high.split()[1]}" \
                   f"{']' if self.le is not None else ')'}"
        return low or high


def rule(default=MISSING, *, factory=None, **checks):
    """A schema field whose value `validate` checks by Rule(**checks) wherever its section is in use."""
    kwargs = {"default_factory": factory} if factory is not None else {"default": default}
    return field(metadata={"rule": Rule(**checks)}, **kwargs)


def roles_needed(cfg: DictConfig) -> set[str]:
    """The roles a PPO run starts: the reference only for a KL term (and not when the actor ranks
    compute it, reference.from_actor_base), the critic only for GAE."""
    roles = {"rollout", "reward", "actor"}
    if cfg.algorithm.kl_coef > 0 and not cfg.reference.from_actor_base:
        roles.add("reference")
    if cfg.algorithm.estimator == "gae":
        roles.add("critic")
    return roles


def trainer_roles(cfg: DictConfig, stage: str | None) -> list[str]:
    """The trainer roles that `stage` (None: every stage of the pipeline) starts."""
    stages = cfg.pipeline.stages if stage is None else [stage]
    roles = [role for role in SUPERVISED_STAGES if role in stages]
    if "ppo" in stages:
        roles += [role for role in ("actor", "critic") if role in roles_needed(cfg)]
    return roles


def validate(cfg: DictConfig, stage: str | None = "ppo") -> None:
    """Checks that OmegaConf's types cannot express, for `stage` (None: the pipeline's stages):
    each field's own rule (`rule` in the schema) in every section the stage uses, only the roles it
    starts (a GRPO run has no critic to check), then the rules that tie fields together."""
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("config key 'model.path' is required (an HF id or a local path)")
    for section in sections_in_use(cfg, stage):
        _check_fields(cfg[section], section)
    _check_common(cfg, stage)
    if stage in SUPERVISED_STAGES:
        _check_supervised(cfg, stage)
    elif stage == "ppo":
        _check_ppo(cfg)


def sections_in_use(cfg: DictConfig, stage: str | None) -> list[str]:
    """The top-level config sections that `stage` (None: every stage of the pipeline) reads."""
    sections = ["model", "ray", "logging", "bench", "pipeline", *trainer_roles(cfg, stage)]
    if stage == "ppo":
        sections += ["data", "rollout", "reward", "algorithm", "trainer", "eval", "weight_sync"]
        if "reference" in roles_needed(cfg):
            sections.append("reference")
    elif "dpo" in trainer_roles(cfg, stage) and cfg.eval.function:  # its policies' task accuracy
        sections += ["data", "rollout", "eval"]
    return sections


def _check_fields(node: DictConfig, prefix: str) -> None:
    """Each field's rule, in the section `node` and the sections nested in it."""
    for spec in fields(OmegaConf.get_type(node)):
        key = f"{prefix}.{spec.name}"
        if is_dataclass(spec.default_factory):
            _check_fields(node[spec.name], key)
        elif "rule" in spec.metadata:
            problem = spec.metadata["rule"].problem(node[spec.name])
            _check(problem is None, key, problem or "")


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {why}")


# The rules that tie fields together.

def _check_common(cfg: DictConfig, stage: str | None) -> None:
    hidden = cfg.model.tiny_hidden_size
    _check(hidden >= 32 and hidden % 32 == 0, "model.tiny_hidden_size",
           f"must be a positive multiple of 32 (heads of 32), got {hidden}")
    from rayrlhf.tasks import TASKS

    _check(cfg.data.task in ("", *TASKS), "data.task",
           f"must be empty or a built-in task ({', '.join(TASKS)}); got '{cfg.data.task}'")
    colocated = [role for members in cfg.ray.colocate for role in members]
    for role in colocated:
        _check(role in PPO_ROLES, "ray.colocate", f"names '{role}'; roles are {', '.join(PPO_ROLES)}")
    _check(len(colocated) == len(set(colocated)), "ray.colocate", "names a role more than once")
    for members in cfg.ray.colocate:
        placements = {role: role_placement(cfg.ray, role) for role in members}
        _check(all(where == placements[members[0]] for where in placements.values()), "ray.roles",
               f"differs between the colocated roles {', '.join(members)}, which share bundles: "
               f"{placements}")
    longest_sample = {"actor": cfg.data.max_prompt_tokens + response_budget(cfg.rollout),
                      "sft": cfg.sft.data.max_tokens, "rm": 2 * cfg.rm.data.max_tokens,  # rm, dpo: a pair
                      "dpo": 2 * cfg.dpo.data.max_tokens}
    longest_sample["critic"] = longest_sample["actor"]
    for role in trainer_roles(cfg, stage):
        _check_trainer_role(cfg, role, longest_sample[role])
    for name in cfg.pipeline.stages:
        _check(name in STAGES, "pipeline.stages", f"must list stages among {', '.join(STAGES)}; got '{name}'")
    _check(list(cfg.pipeline.stages) == [s for s in STAGES if s in cfg.pipeline.stages], "pipeline.stages",
           f"must be in the order {', '.join(STAGES)} without repeats")
    stages = set(cfg.pipeline.stages)
    for name in ("sft", "rm"):
        method = cfg[name].peft.method
        later = cfg.pipeline.stages[cfg.pipeline.stages.index(name) + 1:] if name in stages else []
        _check(stage is not None or method not in SOFT_PROMPT_PEFT or not later, "pipeline.stages",
               f"cannot go on to {later[0] if later else ''} after {name} with {name}.peft.method={method}: "
               "its virtual tokens cannot be merged into the weights the next stage loads (use a mergeable "
               f"method, or end the pipeline at {name})")
    _check("dpo" not in stages or not {"rm", "ppo"} & stages, "pipeline.stages",
           "runs dpo in place of rm and ppo ([sft, dpo]), not beside them")
    for name in cfg.pipeline.rerun:
        _check(name in cfg.pipeline.stages, "pipeline.rerun",
               f"names '{name}', which is not in pipeline.stages")


def _check_trainer_role(cfg: DictConfig, role: str, longest_sample: int) -> None:
    r = cfg[role]
    tokens = r.micro_batch_tokens
    _check(tokens == 0 or tokens >= longest_sample, f"{role}.micro_batch_tokens",
           f"must be 0 (off) or at least the longest sample ({longest_sample} tokens), got {tokens}")
    _check(not (r.compile and r.zero_stage == 3), f"{role}.compile",
           "is not supported with zero_stage 3 (its weight-gathering hooks are untested under torch.compile)")
    _check_peft(cfg, role)


def _check_peft(cfg: DictConfig, role: str) -> None:
    r, key = cfg[role], f"{role}.peft.method"
    p = r.peft
    if p.method in MERGEABLE_PEFT:
        _check(len(p.target_modules) > 0, f"{role}.peft.target_modules", "must name at least one module")
    if p.method == "ia3":
        stray = sorted(set(p.feedforward_modules) - set(p.target_modules))
        _check(not stray, f"{role}.peft.feedforward_modules",
               f"must be among the target_modules; {stray} are not")
    if p.method == "qlora":
        _check(importlib.util.find_spec("bitsandbytes") is not None, key,
               "qlora needs bitsandbytes (pip install bitsandbytes), which is not installed")
        _check(r.zero_stage != 3, key, "qlora runs with zero_stage 0-2: ZeRO-3 partitions every parameter, "
               "and a 4-bit base is bitsandbytes' packed bytes with their quantization constants beside them")
    if p.method == "adalora":
        _check(p.init_rank >= p.rank, f"{role}.peft.init_rank",
               f"must be >= peft.rank ({p.rank}), got {p.init_rank}")
        why = ("adalora reallocates ranks from each adapter weight's gradient after the optimizer step and "
               "masks the weights in place, which ZeRO's partitioned gradients and the fp32 master copies of "
               "16-bit training hide from it")
        _check(r.zero_stage == 0, key, f"needs {role}.zero_stage=0: {why}")
        _check(cfg.model.dtype == "float32", key, f"needs model.dtype=float32: {why}")
    if p.method in SOFT_PROMPT_PEFT:
        if role in ("actor", "critic"):
            _check(False, key, f"{p.method} is for the sft, rm and dpo stages: a soft prompt's virtual "
                   "tokens cannot be merged into the weights the rollout engines load (and prefix keys and "
                   f"values have no place in a vLLM engine); train the {role} with lora, qlora, adalora "
                   "or ia3")
        if role == "dpo":
            _check(not r.packing, "dpo.packing", f"is not supported with dpo.peft.method={p.method} (packed "
                   "pairs run as one token stream, with no place for the virtual tokens)")


def _check_supervised(cfg: DictConfig, stage: str) -> None:
    s = cfg[stage]
    _check(s.batch_size % (s.num_ranks * s.micro_batch_size) == 0, f"{stage}.batch_size",
           f"({s.batch_size}) must be a multiple of {stage}.num_ranks x {stage}.micro_batch_size "
           f"({s.num_ranks} x {s.micro_batch_size})")
    _check(bool(s.data.path or cfg.data.task), f"{stage}.data.path",
           "is needed (or data.task for a built-in task's synthetic data)")
    if stage == "dpo":
        _check(s.label_smoothing == 0 or s.loss in ("sigmoid", "simpo"), "dpo.label_smoothing",
               f"is for the sigmoid and simpo losses, not dpo.loss={s.loss}")
        if cfg.eval.function:
            _check(bool(cfg.eval.path or cfg.data.task), "eval.path",
                   "is needed for the task accuracy of eval.function (or data.task for a built-in task's "
                   "held-out prompts)")
            _check_function(cfg, "eval.function")


def _check_ppo(cfg: DictConfig) -> None:
    method = cfg.actor.peft.method
    _check(not cfg.reference.from_actor_base or method in MERGEABLE_PEFT, "reference.from_actor_base",
           f"needs an actor with a mergeable peft.method ({', '.join(MERGEABLE_PEFT)}); with "
           f"actor.peft.method={method} the actor holds no frozen base beside what it trains")
    _check(cfg.rollout.top_k == -1 or cfg.rollout.top_k >= 1, "rollout.top_k",
           f"must be -1 (off) or >= 1, got {cfg.rollout.top_k}")
    _check(cfg.weight_sync.transport != "shared_memory" or cfg.actor.gpus_per_rank == 0,
           "weight_sync.transport", "shared_memory is for CPU trainers and engines (GPUs: cuda_ipc or "
           "collective)")
    _check(cfg.weight_sync.transport != "cuda_ipc" or cfg.actor.gpus_per_rank > 0, "weight_sync.transport",
           "cuda_ipc needs GPU trainers and engines (actor.gpus_per_rank, rollout.gpus_per_engine)")
    tp, gpus = cfg.rollout.tensor_parallel_size, cfg.rollout.gpus_per_engine
    _check(tp == 1 or gpus in (0, tp), "rollout.gpus_per_engine",
           f"must be rollout.tensor_parallel_size ({tp}) for tensor-parallel GPU engines (a GPU per worker, "
           f"all in the engine's bundle); got {gpus}")
    _check(not cfg.rollout.sleep or cfg.rollout.gpus_per_engine > 0, "rollout.sleep",
           "is for GPU engines (vLLM sleep mode releases GPU memory); set rollout.gpus_per_engine")
    _check(not (cfg.rollout.sleep and cfg.trainer.async_rollout), "rollout.sleep",
           "does not go with trainer.async_rollout (the engines generate while the trainers train)")
    algo = cfg.algorithm
    _check(algo.dual_clip is None or algo.policy_loss == "ppo", "algorithm.dual_clip",
           "is for algorithm.policy_loss=ppo (cispo's clipped ratio is a weight, with no surrogate to cap)")
    if algo.dynamic_sampling.enable:
        _check(cfg.rollout.n >= 2, "rollout.n",
               "must be >= 2 with algorithm.dynamic_sampling (it compares the samples of a prompt)")
        _check(algo.estimator != "remax", "algorithm.dynamic_sampling",
               "does not go with algorithm.estimator=remax (its greedy baseline is of the first round's "
               "prompts)")
    _check(cfg.reward.overlong_buffer <= response_budget(cfg.rollout), "reward.overlong_buffer",
           f"({cfg.reward.overlong_buffer}) must not exceed the response length limit "
           f"({response_budget(cfg.rollout)} tokens)")
    k1_loss = algo.kl_in == "loss" and algo.kl_estimator == "k1" and algo.kl_coef > 0
    _check(not k1_loss, "algorithm.kl_estimator",
           "k1 with algorithm.kl_in=loss gives the KL term zero expected gradient (E[grad log pi] = 0 "
           "over the policy's own samples); use k2 (its gradient is that of KL(pi || pi_ref)) or k3, "
           "or put k1 in the reward (kl_in=reward)")
    if algo.estimator in GROUP_ESTIMATORS:
        _check(cfg.rollout.n >= 2, "rollout.n",
               f"must be >= 2 for algorithm.estimator={algo.estimator} (it compares samples of a prompt)")
    _check_reward(cfg)
    _check(not cfg.rollout.tools or cfg.rollout.env == "tools", "rollout.tools",
           "is for rollout.env=tools (the built-in tool-calling environment)")
    if cfg.rollout.env:
        _check(cfg.rollout.env != "tools" or bool(cfg.rollout.tools), "rollout.tools",
               "is needed with rollout.env=tools: a built-in tool set (calculator) or a Python file whose "
               "functions are the tools")
        _check(response_budget(cfg.rollout) >= cfg.rollout.max_new_tokens, "rollout.max_total_tokens",
               f"({cfg.rollout.max_total_tokens}) must be 0 or at least rollout.max_new_tokens")
    _check(bool(cfg.data.path or cfg.data.task), "data.path",
           "is needed (or data.task for a built-in task's prompts)")
    _check(not cfg.eval.every or bool(cfg.eval.path or cfg.data.task), "eval.path",
           "is needed for eval.every > 0 (or data.task for a built-in task's held-out prompts)")
    _check_function(cfg, "eval.function")
    _check((cfg.actor.gpus_per_rank > 0) == (cfg.rollout.gpus_per_engine > 0), "rollout.gpus_per_engine",
           "and actor.gpus_per_rank must both be > 0 (NCCL weight sync) or both 0 (gloo)")
    batch = cfg.trainer.prompts_per_step * cfg.rollout.n
    mini = algo.train_batch_size
    _check(batch % mini == 0, "algorithm.train_batch_size",
           f"({mini}) must divide prompts_per_step x rollout.n ({batch})")
    for role in trainer_roles(cfg, "ppo"):
        ranks, micro = cfg[role].num_ranks, cfg[role].micro_batch_size
        _check(mini % (ranks * micro) == 0, f"{role}.micro_batch_size",
               f"x {role}.num_ranks ({micro} x {ranks}) must divide algorithm.train_batch_size ({mini})")
    _check(cfg.rollout.num_engines <= cfg.trainer.prompts_per_step, "rollout.num_engines",
           "must not exceed trainer.prompts_per_step")
    if cfg.trainer.async_rollout:
        _check(cfg.trainer.max_staleness >= 1, "trainer.max_staleness",
               f"must be >= 1 with trainer.async_rollout, got {cfg.trainer.max_staleness}")
        _check(algo.tis_cap is not None, "algorithm.tis_cap",
               "must be set with trainer.async_rollout (the importance-ratio correction of stale samples; "
               "e.g. 2.0)")
        _check(algo.estimator != "remax", "trainer.async_rollout",
               "does not go with algorithm.estimator=remax (its greedy baseline needs the sampling weights)")


def _check_function(cfg: DictConfig, key: str) -> None:
    """A built-in reward function's name, or a user file (checked when it is loaded)."""
    name = OmegaConf.select(cfg, key)
    if name and ":" not in name and not name.endswith(".py"):
        from rayrlhf.rewards import BUILTIN

        _check(name in BUILTIN, key, f"must be a built-in ({', '.join(BUILTIN)}) or path/to/file.py[:name]; "
               f"got '{name}'")


def _check_reward(cfg: DictConfig) -> None:
    reward = cfg.reward
    _check(bool(reward.function or reward.functions or reward.models or reward.remote or cfg.rollout.env),
           "reward", "needs at least one source: reward.function, reward.functions, reward.models, "
           "reward.remote or an environment (rollout.env)")
    _check_function(cfg, "reward.function")
    for i in range(len(reward.functions)):
        _check_function(cfg, f"reward.functions[{i}].function")


def role_placement(ray_cfg: DictConfig, role: str) -> dict:
    """How `role`'s placement group is made: {"strategy": ..., "node_labels": {...}}; the
    supervised stages' trainers (sft, rm, dpo) take ray.placement_strategy, on any node."""
    if role not in PPO_ROLES:
        return {"strategy": ray_cfg.placement_strategy, "node_labels": {}}
    where = ray_cfg.roles[role]
    return {"strategy": where.strategy or ray_cfg.placement_strategy, "node_labels": dict(where.node_labels)}
