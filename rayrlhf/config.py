"""The one config schema. Every default lives here; YAML presets and `key=value` overrides only
change values the schema already has, and `validate` rejects what cannot run before any actor starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rayrlhf.algorithms import ESTIMATORS, GROUP_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS
from rayrlhf.errors import RayRLHFError


class ConfigError(RayRLHFError):
    """A config that cannot run; the message names the key and the reason."""


@dataclass
class ModelConfig:
    # HF id or local path of the policy (actor, reference and rollout engines start from it).
    path: str = MISSING
    # Tokenizer HF id or path; empty means the model's own.
    tokenizer: str = ""
    # Build a tiny random Llama at `path` when none is there (the built-in default and tests).
    build_tiny: bool = False
    dtype: str = "float32"


@dataclass
class DataConfig:
    # JSONL, Parquet or a local HF `datasets` directory; empty uses the built-in synthetic task.
    path: str = ""
    prompt_field: str = "prompt"
    # Wrap each prompt in the tokenizer's chat template as a user turn.
    chat_template: bool = False
    max_prompt_tokens: int = 64
    # Size of the built-in synthetic prompt set.
    synthetic_size: int = 2048


@dataclass
class RolloutConfig:
    num_engines: int = 1
    cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0
    tensor_parallel_size: int = 1
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    # Strings that end a response (kept in it, so text and tokens agree).
    stop: list[str] = field(default_factory=list)
    # Responses sampled per prompt (the group of the critic-free estimators).
    n: int = 1
    # vLLM KV cache size on CPU (GiB) and memory fraction on GPU.
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.5


@dataclass
class ReferenceConfig:
    """Frozen-model workers (the reference policy; the reward extends it)."""
    num_workers: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    micro_batch_size: int = 64


@dataclass
class RewardModelSpec:
    # HF sequence-classification reward model (one label), read at the last real token.
    path: str = MISSING
    weight: float = 1.0


@dataclass
class RemoteRewardSpec:
    # A `rayrlhf serve-rm` server, e.g. http://127.0.0.1:8000.
    url: str = MISSING
    weight: float = 1.0
    # Bearer token; use `${oc.env:VAR}` to read it from the environment instead of the file.
    token: str = ""


@dataclass
class RewardConfig(ReferenceConfig):
    """The score of a response is the weighted sum of every configured source."""
    # A built-in function (see rayrlhf.rewards.BUILTIN) or `path/to/file.py[:name]` with
    # reward(prompts, responses, **fields) -> list[float]; empty or null for none.
    function: str | None = "alphabet"
    function_weight: float = 1.0
    models: list[RewardModelSpec] = field(default_factory=list)
    remote: list[RemoteRewardSpec] = field(default_factory=list)
    remote_timeout_s: float = 30.0
    remote_retries: int = 2
    # Added to the score of responses cut at max_new_tokens (e.g. -1.0); 0 is off.
    truncated_penalty: float = 0.0
    # Normalise scores over the batch (zero mean, unit variance), then clip to +-clip (0 is off).
    normalize: bool = False
    clip: float = 0.0
    # A sample whose reward is unusable (the function raised, gave the wrong count or NaN):
    # false stops the run naming it; true drops it from training and counts it in the metrics.
    skip_invalid: bool = False


@dataclass
class TrainerRoleConfig:
    # Data-parallel ranks, one Ray actor each.
    num_ranks: int = 1
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0
    zero_stage: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 16
    gradient_checkpointing: bool = False


@dataclass
class CriticConfig(TrainerRoleConfig):
    # Empty starts the critic from the policy model with a fresh value head.
    model_path: str = ""


@dataclass
class AlgorithmConfig:
    # gae (PPO with a critic), grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, remax.
    estimator: str = "gae"
    gamma: float = 1.0
    lam: float = 0.95
    # PPO clip range [1 - clip_eps, 1 + clip_eps_high]; clip_eps_high unset means clip_eps.
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    # Dual clip c > 1 caps the loss of negative-advantage tokens at c |A|; unset is off.
    dual_clip: float | None = None
    entropy_coef: float = 0.0
    # token_mean, seq_mean_token_mean or seq_mean_token_sum_norm (normalised by max_new_tokens).
    loss_agg: str = "token_mean"
    # Value clipping range around the old values; 0 turns value clipping off.
    value_clip_eps: float = 0.2
    # KL to the reference: estimator k1/k2/k3, in the per-token reward or as a loss term.
    kl_estimator: str = "k1"
    kl_in: str = "reward"
    # 0 with no KL anywhere: no reference actors are started.
    kl_coef: float = 0.05
    # Adaptive KL controller: a target KL per sequence; 0 keeps `kl_coef` fixed.
    kl_target: float = 0.0
    kl_horizon: int = 10000
    # Whitening of GAE advantages (REINFORCE++ always whitens; group estimators never).
    whiten_advantages: bool = True
    # Truncated importance sampling: weight each token by min(pi_old / pi_engine, tis_cap).
    tis_cap: float | None = None
    ppo_epochs: int = 1
    # Prompts x samples per optimizer step; must divide the rollout batch.
    train_batch_size: int = 64


@dataclass
class TrainerConfig:
    total_steps: int = 20
    # Prompts sampled per iteration.
    prompts_per_step: int = 64
    # Save the policy (HF format) every N steps; 0 saves only at the end.
    save_every: int = 0
    # Full checkpoints (trainer and optimizer states, KL controller, data position) every N
    # steps under output_dir/checkpoints, keeping the last `keep_checkpoints`; 0 is off.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2


@dataclass
class EvalConfig:
    # Evaluate every N steps on held-out prompts (0: never).
    every: int = 0
    # Prompt file (same formats and fields as data); empty uses fresh built-in prompts.
    path: str = ""
    size: int = 64
    greedy: bool = True


@dataclass
class WeightSyncConfig:
    bucket_mb: float = 64.0
    # Compare engine and trainer log-probs of the sampled tokens every N steps (0: never).
    check_every: int = 1
    # A gap above this (mean absolute log-prob difference) is reported as a warning.
    warn_gap: float = 0.05
    timeout_s: float = 600.0


@dataclass
class RayConfig:
    # Existing cluster address ("auto" under `ray job submit`); empty starts a local one.
    address: str = ""
    # Logical CPUs for a local cluster; more than the cores is fine (actors mostly wait).
    num_cpus: int = 8
    # Torch intra-op threads per actor.
    threads_per_actor: int = 1
    # Stream the actors' own logs (vLLM, DeepSpeed) to the console; they are always in Ray's log dir.
    log_to_driver: bool = False
    # How each role's bundles are placed: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD.
    placement_strategy: str = "PACK"
    # Any remote call (generation, scoring, a training phase) taking longer is an error, not a hang.
    call_timeout_s: float = 3600.0


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    seed: int = 0
    # "true" (or "latest") resumes from the newest checkpoint in output_dir; a path resumes from it.
    resume: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    actor: TrainerRoleConfig = field(default_factory=TrainerRoleConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- YAML preset <- dotted overrides, then validation. Unknown keys are errors."""
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_explain(err)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise ConfigError(f"override '{item}': {_explain(err)}") from None
    validate(cfg)
    return cfg


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    reason = str(err).splitlines()[0]
    if "not in" in reason or "Key '" in reason and "not" in reason:
        return f"unknown config key '{key}'"
    return f"bad value for config key '{key}': {reason}"


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {why}")


def validate(cfg: DictConfig) -> None:
    """Range and consistency checks that OmegaConf's types cannot express."""
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("config key 'model.path' is required (an HF id or a local path)")
    positive_ints = {
        "rollout.num_engines": cfg.rollout.num_engines,
        "rollout.tensor_parallel_size": cfg.rollout.tensor_parallel_size,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "rollout.n": cfg.rollout.n,
        "reward.num_workers": cfg.reward.num_workers,
        "reward.micro_batch_size": cfg.reward.micro_batch_size,
        "reference.num_workers": cfg.reference.num_workers,
        "reference.micro_batch_size": cfg.reference.micro_batch_size,
        "actor.num_ranks": cfg.actor.num_ranks,
        "actor.micro_batch_size": cfg.actor.micro_batch_size,
        "critic.num_ranks": cfg.critic.num_ranks,
        "critic.micro_batch_size": cfg.critic.micro_batch_size,
        "algorithm.ppo_epochs": cfg.algorithm.ppo_epochs,
        "algorithm.train_batch_size": cfg.algorithm.train_batch_size,
        "algorithm.kl_horizon": cfg.algorithm.kl_horizon,
        "trainer.total_steps": cfg.trainer.total_steps,
        "trainer.prompts_per_step": cfg.trainer.prompts_per_step,
        "trainer.keep_checkpoints": cfg.trainer.keep_checkpoints,
        "data.max_prompt_tokens": cfg.data.max_prompt_tokens,
        "data.synthetic_size": cfg.data.synthetic_size,
        "ray.num_cpus": cfg.ray.num_cpus,
        "ray.threads_per_actor": cfg.ray.threads_per_actor,
    }
    for key, value in positive_ints.items():
        _check(value >= 1, key, f"must be >= 1, got {value}")
    non_negative = {
        "trainer.save_every": cfg.trainer.save_every,
        "trainer.checkpoint_every": cfg.trainer.checkpoint_every,
        "weight_sync.check_every": cfg.weight_sync.check_every,
        "algorithm.kl_coef": cfg.algorithm.kl_coef,
        "algorithm.kl_target": cfg.algorithm.kl_target,
        "algorithm.value_clip_eps": cfg.algorithm.value_clip_eps,
        "actor.weight_decay": cfg.actor.weight_decay,
        "critic.weight_decay": cfg.critic.weight_decay,
    }
    for key, value in non_negative.items():
        _check(value >= 0, key, f"must be >= 0, got {value}")
    for key in ("rollout.cpus_per_engine", "reward.cpus_per_worker", "reference.cpus_per_worker",
                "actor.cpus_per_rank", "critic.cpus_per_rank"):
        value = OmegaConf.select(cfg, key)
        _check(value > 0, key, f"must be > 0, got {value}")
    for key in ("rollout.gpus_per_engine", "reward.gpus_per_worker", "reference.gpus_per_worker",
                "actor.gpus_per_rank", "critic.gpus_per_rank"):
        value = OmegaConf.select(cfg, key)
        _check(value >= 0, key, f"must be >= 0, got {value}")
    for role in ("actor", "critic"):
        _check(cfg[role].zero_stage in (0, 1, 2, 3), f"{role}.zero_stage",
               f"must be 0, 1, 2 or 3, got {cfg[role].zero_stage}")
        _check(cfg[role].lr > 0, f"{role}.lr", f"must be > 0, got {cfg[role].lr}")
        _check(cfg[role].grad_clip >= 0, f"{role}.grad_clip", "must be >= 0")
    for key in ("algorithm.gamma", "algorithm.lam", "rollout.top_p"):
        value = OmegaConf.select(cfg, key)
        _check(0 < value <= 1 or (key != "rollout.top_p" and value == 0), key,
               f"must be in (0, 1], got {value}")
    _check(cfg.rollout.temperature > 0, "rollout.temperature",
           f"must be > 0 (training log-probs divide by it), got {cfg.rollout.temperature}")
    _check(cfg.rollout.top_k == -1 or cfg.rollout.top_k >= 1, "rollout.top_k",
           f"must be -1 (off) or >= 1, got {cfg.rollout.top_k}")
    _check(cfg.weight_sync.bucket_mb > 0, "weight_sync.bucket_mb", "must be > 0")
    _check(cfg.weight_sync.timeout_s > 0, "weight_sync.timeout_s", "must be > 0")
    _check(cfg.ray.call_timeout_s > 0, "ray.call_timeout_s", "must be > 0")
    _one_of(cfg, "ray.placement_strategy", ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    _check_algorithm(cfg)
    _check_reward(cfg)
    _check(cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
           f"must be float32, bfloat16 or float16, got {cfg.model.dtype}")

    _check((cfg.actor.gpus_per_rank > 0) == (cfg.rollout.gpus_per_engine > 0), "rollout.gpus_per_engine",
           "and actor.gpus_per_rank must both be > 0 (NCCL weight sync) or both 0 (gloo)")

    batch = cfg.trainer.prompts_per_step * cfg.rollout.n
    mini = cfg.algorithm.train_batch_size
    _check(batch % mini == 0, "algorithm.train_batch_size",
           f"({mini}) must divide prompts_per_step x rollout.n ({batch})")
    for role in ("actor", "critic"):
        ranks, micro = cfg[role].num_ranks, cfg[role].micro_batch_size
        _check(mini % (ranks * micro) == 0, f"{role}.micro_batch_size",
               f"x {role}.num_ranks ({micro} x {ranks}) must divide algorithm.train_batch_size ({mini})")
    _check(cfg.rollout.num_engines <= cfg.trainer.prompts_per_step, "rollout.num_engines",
           "must not exceed trainer.prompts_per_step")


def _one_of(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value in allowed, key, f"must be one of {', '.join(allowed)}; got '{value}'")


def _check_algorithm(cfg: DictConfig) -> None:
    algo = cfg.algorithm
    _one_of(cfg, "algorithm.estimator", ESTIMATORS)
    _one_of(cfg, "algorithm.kl_estimator", KL_ESTIMATORS)
    _one_of(cfg, "algorithm.loss_agg", LOSS_AGGREGATIONS)
    _one_of(cfg, "algorithm.kl_in", ("reward", "loss"))
    _check(0 < algo.clip_eps < 1, "algorithm.clip_eps", f"must be in (0, 1), got {algo.clip_eps}")
    _check(algo.clip_eps_high is None or algo.clip_eps_high > 0, "algorithm.clip_eps_high",
           f"must be > 0, got {algo.clip_eps_high}")
    _check(algo.dual_clip is None or algo.dual_clip > 1, "algorithm.dual_clip",
           f"must be > 1, got {algo.dual_clip}")
    _check(algo.tis_cap is None or algo.tis_cap > 0, "algorithm.tis_cap", f"must be > 0, got {algo.tis_cap}")
    _check(algo.entropy_coef >= 0, "algorithm.entropy_coef", f"must be >= 0, got {algo.entropy_coef}")
    if algo.estimator in GROUP_ESTIMATORS:
        _check(cfg.rollout.n >= 2, "rollout.n",
               f"must be >= 2 for algorithm.estimator={algo.estimator} (it compares samples of a prompt)")
    _check(cfg.rollout.repetition_penalty > 0, "rollout.repetition_penalty", "must be > 0")
    _check(cfg.eval.every >= 0, "eval.every", f"must be >= 0, got {cfg.eval.every}")
    _check(cfg.eval.size >= 1, "eval.size", f"must be >= 1, got {cfg.eval.size}")


def _check_reward(cfg: DictConfig) -> None:
    reward = cfg.reward
    _check(bool(reward.function or reward.models or reward.remote), "reward",
           "needs at least one source: reward.function, reward.models or reward.remote")
    if reward.function and ":" not in reward.function and not reward.function.endswith(".py"):
        from rayrlhf.rewards import BUILTIN

        _check(reward.function in BUILTIN, "reward.function",
               f"must be a built-in ({', '.join(BUILTIN)}) or path/to/file.py[:name]; "
               f"got '{reward.function}'")
    _check(reward.clip >= 0, "reward.clip", f"must be >= 0, got {reward.clip}")
    _check(reward.remote_timeout_s > 0, "reward.remote_timeout_s", "must be > 0")
    _check(reward.remote_retries >= 0, "reward.remote_retries", "must be >= 0")
