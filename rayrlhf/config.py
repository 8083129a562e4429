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
    # Build a tiny random Llama at `path` when none is there (the built-in default, tests and the
    # CPU benchmark profile), of this width and depth.
    build_tiny: bool = False
    tiny_hidden_size: int = 128
    tiny_layers: int = 2
    dtype: str = "float32"
    # The fp32 CPU products of the trained and scoring models' linear layers: onednn (x86), torch
    # (its BLAS, MKL), or auto: oneDNN on AMD CPUs, where MKL runs its AVX2 path (oneDNN about 2x
    # on the AMD EPYC measured), torch's elsewhere (MKL faster on the Intel Xeon measured).
    linear_backend: str = "auto"


@dataclass
class DataConfig:
    # JSONL, Parquet or a local HF `datasets` directory; empty uses the prompts of `task`.
    path: str = ""
    # A built-in synthetic task (see rayrlhf.tasks.TASKS) supplying prompts, and for SFT and RM
    # demonstrations and preference pairs, when no dataset path is given.
    task: str = ""
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
    # KV cache block size in tokens; 0 keeps vLLM's (128 on CPU, 16 on GPU). vLLM's CPU attention
    # wants a multiple of 32: 32 generated the CPU bench point (contexts under 40 tokens) 5-9%
    # faster than 128.
    block_size: int = 0
    gpu_memory_utilization: float = 0.5
    # Engines that die during a run are started again (with the current weights) and the lost
    # work retried, up to this many restarts in the run.
    max_restarts: int = 3
    # GPU engines colocated with trainers: after sampling, release the KV cache and weights
    # (vLLM sleep mode) so training can use the memory; the weight sync restores them.
    sleep: bool = False
    # vLLM's enforce_eager. false captures CUDA graphs on GPU (much faster decoding of small
    # batches) and compiles the model on CPU (generation of the CPU bench model 10-30% faster,
    # for 40-75 s more start-up per engine on 2 cores); true starts in seconds.
    enforce_eager: bool = True


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
class LoraConfig:
    # LoRA rank (via peft); 0 trains every parameter.
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainerRoleConfig:
    # Data-parallel ranks, one Ray actor each.
    num_ranks: int = 1
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0
    zero_stage: int = 2
    lr: float = 1e-5
    # The learning rate over the role's optimizer steps: warmup_steps rising linearly from 0, then
    # constant, or linear or cosine down to min_lr_ratio x lr at the last step (trainer.lr_factor).
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 16
    # > 0: micro-batches of about this many real tokens instead of micro_batch_size rows, as
    # many on every rank, balanced by tokens (at least the longest sample).
    micro_batch_tokens: int = 0
    gradient_checkpointing: bool = False
    # torch.compile the model's transformer layers (inductor, dynamic shapes): the CPU bench's
    # train stage 17-18% faster in three of four in-process measurements, for 40-90 s of
    # compilation (the actor and critic compile during set-up, beside the engines' start-up;
    # torch caches it on disk). Not with ZeRO-3 partitioned weights.
    compile: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class PPOTrainerConfig(TrainerRoleConfig):
    # Pack samples end to end into rows as wide as the longest one (no padding computed between
    # them; each attends only to itself).
    packing: bool = False
    # With packing, the responses to one prompt (GRPO's group) follow one copy of it in a row, so
    # the prompt is computed once for all of them (the same log-probs and gradients).
    share_prompts: bool = True


@dataclass
class CriticConfig(PPOTrainerConfig):
    # Empty starts the critic from the policy model with a fresh value head.
    model_path: str = ""


@dataclass
class SupervisedDataConfig:
    # JSONL, Parquet or a local HF `datasets` directory; empty uses the built-in `data.task`.
    path: str = ""
    # Held-out rows: a file in the same format, else the last `eval_fraction` of `path`.
    eval_path: str = ""
    eval_fraction: float = 0.1
    prompt_field: str = "prompt"
    # SFT reads the response; reward-model training reads the chosen and rejected responses.
    response_field: str = "response"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # Wrap each prompt in the tokenizer's chat template as a user turn.
    chat_template: bool = False
    # Longest prompt + response in tokens; a longer sample is truncated (its response cut) or
    # dropped, and counted either way.
    max_tokens: int = 128
    overlong: str = "truncate"
    # Rows of the built-in task's data (held-out rows are extra).
    synthetic_size: int = 2048


@dataclass
class SupervisedStageConfig(TrainerRoleConfig):
    """SFT or reward-model training: data-parallel DeepSpeed ranks on (prompt, response) data."""
    data: SupervisedDataConfig = field(default_factory=SupervisedDataConfig)
    # Model to start from; empty means model.path (SFT) or the SFT output / model.path (RM).
    model_path: str = ""
    epochs: int = 1
    # Stop after this many optimizer steps (0: run every epoch).
    max_steps: int = 0
    # Samples (SFT) or pairs (RM) per optimizer step, over all ranks.
    batch_size: int = 32
    # Held-out evaluation every N steps, and always at the end (0: only at the end).
    eval_every: int = 0
    # Full checkpoints (DeepSpeed states, RNG states, data position) every N steps under
    # output_dir/checkpoints, keeping the last `keep_checkpoints`; 0 is off. Resume with resume=true.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2


@dataclass
class SFTConfig(SupervisedStageConfig):
    # Pack several short samples into each row (attention kept within a sample).
    packing: bool = False


@dataclass
class PipelineConfig:
    # Stages that run, in this order, each reading the previous one's checkpoint.
    stages: list[str] = field(default_factory=lambda: ["sft", "rm", "ppo"])
    # Stages to run again although their outputs exist (the stages after them rerun too).
    rerun: list[str] = field(default_factory=list)
    # Weight of the trained reward model among the PPO reward sources.
    rm_weight: float = 1.0
    # Start the PPO critic from the trained reward model (as InstructGPT does).
    critic_from_rm: bool = True


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
    # With one optimizer step per batch (ppo_epochs 1, train_batch_size = the batch) and no KL in
    # the reward, pi_old is the policy being trained: its log-probs come from the training forward
    # and the separate old-log-prob forward is skipped. true runs that forward anyway.
    recompute_old_logprobs: bool = False


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
    # Asynchronous mode: the engines generate the next batches while the trainers train, up to
    # `max_staleness` weight updates behind (so off-policy by that much; algorithm.tis_cap
    # corrects for it). false: generate, then train, on-policy.
    async_rollout: bool = False
    max_staleness: int = 1


@dataclass
class EvalConfig:
    # Evaluate every N steps on held-out prompts (0: never).
    every: int = 0
    # Prompt file (same formats and fields as data); empty uses fresh built-in prompts.
    path: str = ""
    size: int = 64
    greedy: bool = True
    # A reward function that scores held-out responses beside the reward sources, logged as
    # eval/rule_score (e.g. a task's accuracy rule that training never sees); empty is none.
    function: str = ""
    # Also evaluate the starting policy, logged as step 0.
    before_training: bool = False


@dataclass
class WeightSyncConfig:
    bucket_mb: float = 64.0
    # shared_memory: through a /dev/shm file (CPU, every engine on actor rank 0's node);
    # cuda_ipc: through a buffer on the GPU an engine shares with an actor rank (colocated);
    # collective: a gloo/NCCL broadcast group; auto: the first of these that the placement allows.
    transport: str = "auto"
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
    # Start the Ray dashboard with a local cluster, bound to 127.0.0.1 (port 8265) only; reach it
    # from elsewhere through an SSH tunnel, never by binding it to a public interface.
    dashboard: bool = False
    # Torch intra-op threads per actor.
    threads_per_actor: int = 1
    # Stream the actors' own logs (vLLM, DeepSpeed) to the console; they are always in Ray's log dir.
    log_to_driver: bool = False
    # How each role's bundles are placed: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD.
    placement_strategy: str = "PACK"
    # Groups of roles that share placement bundles, e.g. [[actor, reference, reward]]: bundle i
    # holds actor i of each role in the group and their cpus/gpus added up (0.5 GPU each puts two
    # roles on one GPU). Roles: rollout, reference, reward, actor, critic.
    colocate: list[list[str]] = field(default_factory=list)
    # Any remote call (generation, scoring, a training phase) taking longer is an error, not a hang.
    call_timeout_s: float = 3600.0


@dataclass
class LoggingConfig:
    # TensorBoard event files under output_dir/tensorboard.
    tensorboard: bool = True
    # Weights & Biases; mode "offline" writes under output_dir/wandb without any network.
    wandb: bool = False
    wandb_project: str = "rayrlhf"
    wandb_mode: str = "offline"


@dataclass
class BenchConfig:
    # Iterations per measured run; the first `warmup_steps` are left out of every figure.
    steps: int = 5
    warmup_steps: int = 2
    # Extra runs beside the configured one: other prompts per step, other response lengths.
    sweep_prompts: list[int] = field(default_factory=list)
    sweep_max_new_tokens: list[int] = field(default_factory=list)
    # Run Hugging Face TRL's GRPOTrainer on the configured point too (needs `pip install trl`).
    trl: bool = True
    # Peak FLOP/s of one training device (TFLOP/s) for model FLOPs utilisation; 0: unknown.
    peak_tflops: float = 0.0


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
    actor: PPOTrainerConfig = field(default_factory=PPOTrainerConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: SupervisedStageConfig = field(default_factory=SupervisedStageConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


STAGES = ("sft", "rm", "ppo")
PPO_ROLES = ("rollout", "reference", "reward", "actor", "critic")
WEIGHT_TRANSPORTS = ("auto", "shared_memory", "cuda_ipc", "collective")
LR_SCHEDULES = ("constant", "linear", "cosine")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                stage: str | None = "ppo") -> DictConfig:
    """Schema <- YAML preset <- dotted overrides, then validation for `stage` (sft, rm or ppo;
    None for the pipeline, which validates each stage's derived config). Unknown keys are errors."""
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
    validate(cfg, stage)
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


def validate(cfg: DictConfig, stage: str | None = "ppo") -> None:
    """Range and consistency checks that OmegaConf's types cannot express: those every command
    shares, then the stage's own."""
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("config key 'model.path' is required (an HF id or a local path)")
    _check(cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
           f"must be float32, bfloat16 or float16, got {cfg.model.dtype}")
    _check(cfg.model.linear_backend in ("auto", "onednn", "torch"), "model.linear_backend",
           f"must be auto, onednn or torch, got {cfg.model.linear_backend}")
    hidden = cfg.model.tiny_hidden_size
    _check(hidden >= 32 and hidden % 32 == 0, "model.tiny_hidden_size",
           f"must be a positive multiple of 32 (heads of 32), got {hidden}")
    _check(cfg.model.tiny_layers >= 1, "model.tiny_layers", f"must be >= 1, got {cfg.model.tiny_layers}")
    from rayrlhf.tasks import TASKS

    _check(cfg.data.task in ("", *TASKS), "data.task",
           f"must be empty or a built-in task ({', '.join(TASKS)}); got '{cfg.data.task}'")
    _check(cfg.ray.num_cpus >= 1, "ray.num_cpus", f"must be >= 1, got {cfg.ray.num_cpus}")
    _check(cfg.ray.threads_per_actor >= 1, "ray.threads_per_actor", "must be >= 1")
    _check(cfg.ray.call_timeout_s > 0, "ray.call_timeout_s", "must be > 0")
    _one_of(cfg, "ray.placement_strategy", ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    _one_of(cfg, "logging.wandb_mode", ("offline", "online", "disabled"))
    colocated = [role for members in cfg.ray.colocate for role in members]
    for role in colocated:
        _check(role in PPO_ROLES, "ray.colocate", f"names '{role}'; roles are {', '.join(PPO_ROLES)}")
    _check(len(colocated) == len(set(colocated)), "ray.colocate", "names a role more than once")
    longest_sample = {"actor": cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                      "sft": cfg.sft.data.max_tokens, "rm": 2 * cfg.rm.data.max_tokens}  # rm: a pair
    longest_sample["critic"] = longest_sample["actor"]
    for role, longest in longest_sample.items():
        _check_trainer_role(cfg, role, longest)
    for name in cfg.pipeline.stages:
        _check(name in STAGES, "pipeline.stages", f"must list stages among {', '.join(STAGES)}; got '{name}'")
    _check(list(cfg.pipeline.stages) == [s for s in STAGES if s in cfg.pipeline.stages], "pipeline.stages",
           f"must be in the order {', '.join(STAGES)} without repeats")
    for name in cfg.pipeline.rerun:
        _check(name in cfg.pipeline.stages, "pipeline.rerun",
               f"names '{name}', which is not in pipeline.stages")
    b = cfg.bench
    _check(b.steps >= 1, "bench.steps", f"must be >= 1, got {b.steps}")
    _check(b.warmup_steps >= 0, "bench.warmup_steps", f"must be >= 0, got {b.warmup_steps}")
    _check(b.peak_tflops >= 0, "bench.peak_tflops", f"must be >= 0, got {b.peak_tflops}")
    for key in ("sweep_prompts", "sweep_max_new_tokens"):
        _check(all(v >= 1 for v in b[key]), f"bench.{key}", f"must hold values >= 1, got {list(b[key])}")
    if stage in ("sft", "rm"):
        _check_supervised(cfg, stage)
    elif stage == "ppo":
        _check_ppo(cfg)


def _check_trainer_role(cfg: DictConfig, role: str, longest_sample: int) -> None:
    r = cfg[role]
    for key in ("num_ranks", "micro_batch_size"):
        _check(r[key] >= 1, f"{role}.{key}", f"must be >= 1, got {r[key]}")
    tokens = r.micro_batch_tokens
    _check(tokens == 0 or tokens >= longest_sample, f"{role}.micro_batch_tokens",
           f"must be 0 (off) or at least the longest sample ({longest_sample} tokens), got {tokens}")
    _check(r.cpus_per_rank > 0, f"{role}.cpus_per_rank", f"must be > 0, got {r.cpus_per_rank}")
    _check(r.gpus_per_rank >= 0, f"{role}.gpus_per_rank", f"must be >= 0, got {r.gpus_per_rank}")
    _check(r.zero_stage in (0, 1, 2, 3), f"{role}.zero_stage", f"must be 0, 1, 2 or 3, got {r.zero_stage}")
    _check(not (r.compile and r.zero_stage == 3), f"{role}.compile",
           "is not supported with zero_stage 3 (its weight-gathering hooks are untested under torch.compile)")
    _check(r.lr > 0, f"{role}.lr", f"must be > 0, got {r.lr}")
    _check(r.grad_clip >= 0, f"{role}.grad_clip", "must be >= 0")
    _check(r.weight_decay >= 0, f"{role}.weight_decay", f"must be >= 0, got {r.weight_decay}")
    _one_of(cfg, f"{role}.lr_schedule", LR_SCHEDULES)
    _check(r.warmup_steps >= 0, f"{role}.warmup_steps", f"must be >= 0, got {r.warmup_steps}")
    _check(0 <= r.min_lr_ratio <= 1, f"{role}.min_lr_ratio", f"must be in [0, 1], got {r.min_lr_ratio}")
    _check(r.lora.rank >= 0, f"{role}.lora.rank", f"must be >= 0 (0 is off), got {r.lora.rank}")
    if r.lora.rank:
        _check(r.lora.alpha > 0, f"{role}.lora.alpha", f"must be > 0, got {r.lora.alpha}")
        _check(0 <= r.lora.dropout < 1, f"{role}.lora.dropout", f"must be in [0, 1), got {r.lora.dropout}")
        _check(len(r.lora.target_modules) > 0, f"{role}.lora.target_modules", "must name at least one module")


def _check_supervised(cfg: DictConfig, stage: str) -> None:
    s, data = cfg[stage], cfg[stage].data
    for key in ("epochs", "batch_size"):
        _check(s[key] >= 1, f"{stage}.{key}", f"must be >= 1, got {s[key]}")
    for key in ("max_steps", "eval_every", "checkpoint_every"):
        _check(s[key] >= 0, f"{stage}.{key}", f"must be >= 0, got {s[key]}")
    _check(s.keep_checkpoints >= 1, f"{stage}.keep_checkpoints", f"must be >= 1, got {s.keep_checkpoints}")
    _check(s.batch_size % (s.num_ranks * s.micro_batch_size) == 0, f"{stage}.batch_size",
           f"({s.batch_size}) must be a multiple of {stage}.num_ranks x {stage}.micro_batch_size "
           f"({s.num_ranks} x {s.micro_batch_size})")
    _check(data.max_tokens >= 2, f"{stage}.data.max_tokens", f"must be >= 2, got {data.max_tokens}")
    _one_of(cfg, f"{stage}.data.overlong", ("truncate", "drop"))
    _check(0 < data.eval_fraction < 1, f"{stage}.data.eval_fraction",
           f"must be in (0, 1), got {data.eval_fraction}")
    _check(data.synthetic_size >= 1, f"{stage}.data.synthetic_size", "must be >= 1")
    _check(bool(data.path or cfg.data.task), f"{stage}.data.path",
           "is needed (or data.task for a built-in task's synthetic data)")


def _check_ppo(cfg: DictConfig) -> None:
    positive_ints = {
        "rollout.num_engines": cfg.rollout.num_engines,
        "rollout.tensor_parallel_size": cfg.rollout.tensor_parallel_size,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "rollout.n": cfg.rollout.n,
        "reward.num_workers": cfg.reward.num_workers,
        "reward.micro_batch_size": cfg.reward.micro_batch_size,
        "reference.num_workers": cfg.reference.num_workers,
        "reference.micro_batch_size": cfg.reference.micro_batch_size,
        "algorithm.ppo_epochs": cfg.algorithm.ppo_epochs,
        "algorithm.train_batch_size": cfg.algorithm.train_batch_size,
        "algorithm.kl_horizon": cfg.algorithm.kl_horizon,
        "trainer.total_steps": cfg.trainer.total_steps,
        "trainer.prompts_per_step": cfg.trainer.prompts_per_step,
        "trainer.keep_checkpoints": cfg.trainer.keep_checkpoints,
        "data.max_prompt_tokens": cfg.data.max_prompt_tokens,
        "data.synthetic_size": cfg.data.synthetic_size,
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
        "rollout.max_restarts": cfg.rollout.max_restarts,
        "rollout.block_size": cfg.rollout.block_size,  # 0: vLLM's own
    }
    for key, value in non_negative.items():
        _check(value >= 0, key, f"must be >= 0, got {value}")
    for key in ("rollout.cpus_per_engine", "reward.cpus_per_worker", "reference.cpus_per_worker"):
        value = OmegaConf.select(cfg, key)
        _check(value > 0, key, f"must be > 0, got {value}")
    for key in ("rollout.gpus_per_engine", "reward.gpus_per_worker", "reference.gpus_per_worker"):
        value = OmegaConf.select(cfg, key)
        _check(value >= 0, key, f"must be >= 0, got {value}")
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
    _one_of(cfg, "weight_sync.transport", WEIGHT_TRANSPORTS)
    _check(cfg.weight_sync.transport != "shared_memory" or cfg.actor.gpus_per_rank == 0,
           "weight_sync.transport", "shared_memory is for CPU trainers and engines (GPUs: cuda_ipc or "
           "collective)")
    _check(cfg.weight_sync.transport != "cuda_ipc" or cfg.actor.gpus_per_rank > 0, "weight_sync.transport",
           "cuda_ipc needs GPU trainers and engines (actor.gpus_per_rank, rollout.gpus_per_engine)")
    _check(not cfg.rollout.sleep or cfg.rollout.gpus_per_engine > 0, "rollout.sleep",
           "is for GPU engines (vLLM sleep mode releases GPU memory); set rollout.gpus_per_engine")
    _check(not (cfg.rollout.sleep and cfg.trainer.async_rollout), "rollout.sleep",
           "does not go with trainer.async_rollout (the engines generate while the trainers train)")
    _check_algorithm(cfg)
    _check_reward(cfg)
    _check(bool(cfg.data.path or cfg.data.task), "data.path",
           "is needed (or data.task for a built-in task's prompts)")
    _check(not cfg.eval.every or bool(cfg.eval.path or cfg.data.task), "eval.path",
           "is needed for eval.every > 0 (or data.task for a built-in task's held-out prompts)")
    _check_function(cfg, "eval.function")

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
    if cfg.trainer.async_rollout:
        _check(cfg.trainer.max_staleness >= 1, "trainer.max_staleness",
               f"must be >= 1 with trainer.async_rollout, got {cfg.trainer.max_staleness}")
        _check(cfg.algorithm.tis_cap is not None, "algorithm.tis_cap",
               "must be set with trainer.async_rollout (the importance-ratio correction of stale samples; "
               "e.g. 2.0)")
        _check(cfg.algorithm.estimator != "remax", "trainer.async_rollout",
               "does not go with algorithm.estimator=remax (its greedy baseline needs the sampling weights)")


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
    k1_loss = algo.kl_in == "loss" and algo.kl_estimator == "k1" and algo.kl_coef > 0
    _check(not k1_loss, "algorithm.kl_estimator",
           "k1 with algorithm.kl_in=loss gives the KL term zero expected gradient (E[grad log pi] = 0 "
           "over the policy's own samples); use k2 (its gradient is that of KL(pi || pi_ref)) or k3, "
           "or put k1 in the reward (kl_in=reward)")
    if algo.estimator in GROUP_ESTIMATORS:
        _check(cfg.rollout.n >= 2, "rollout.n",
               f"must be >= 2 for algorithm.estimator={algo.estimator} (it compares samples of a prompt)")
    _check(cfg.rollout.repetition_penalty > 0, "rollout.repetition_penalty", "must be > 0")
    _check(cfg.eval.every >= 0, "eval.every", f"must be >= 0, got {cfg.eval.every}")
    _check(cfg.eval.size >= 1, "eval.size", f"must be >= 1, got {cfg.eval.size}")


def _check_function(cfg: DictConfig, key: str) -> None:
    """A built-in reward function's name, or a user file (checked when it is loaded)."""
    name = OmegaConf.select(cfg, key)
    if name and ":" not in name and not name.endswith(".py"):
        from rayrlhf.rewards import BUILTIN

        _check(name in BUILTIN, key, f"must be a built-in ({', '.join(BUILTIN)}) or path/to/file.py[:name]; "
               f"got '{name}'")


def _check_reward(cfg: DictConfig) -> None:
    reward = cfg.reward
    _check(bool(reward.function or reward.models or reward.remote), "reward",
           "needs at least one source: reward.function, reward.models or reward.remote")
    _check_function(cfg, "reward.function")
    _check(reward.clip >= 0, "reward.clip", f"must be >= 0, got {reward.clip}")
    _check(reward.remote_timeout_s > 0, "reward.remote_timeout_s", "must be > 0")
    _check(reward.remote_retries >= 0, "reward.remote_retries", "must be >= 0")
