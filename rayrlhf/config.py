"""The one config schema. Every default lives here; YAML presets and `key=value` overrides only
change values the schema already has, and `validate` rejects what cannot run before any actor starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rayrlhf.algorithms import (
    ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    RATIO_LEVELS,
)
from rayrlhf.rollout import ENGINES
from rayrlhf.tiny import TEST_FAMILIES
from rayrlhf.validation import LR_SCHEDULES, PEFT_METHODS, WEIGHT_TRANSPORTS, ConfigError, rule, validate


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
    tiny_layers: int = rule(2, ge=1)
    # Empty: the character-level Llama (57 tokens). Else a model shaped like that family
    # (rayrlhf.tiny.TEST_FAMILIES) behind its real tokenizer: qwen2 and mistral 131k tokens
    # (tekken), qwen3 32k.
    tiny_family: str = rule("", one_of=("", *TEST_FAMILIES))
    # Add the characters of tool calls (<>{}_[]) to the character vocabulary (conf/tiny_agent.yaml).
    tiny_tool_chars: bool = False
    dtype: str = rule("float32", one_of=("float32", "bfloat16", "float16"))
    # The fp32 CPU products of the trained and scoring models' linear layers: onednn (x86), torch
    # (its BLAS, MKL), or auto: oneDNN on AMD CPUs, where MKL runs its AVX2 path (oneDNN about 2x
    # on the AMD EPYC measured), torch's elsewhere (MKL faster on the Intel Xeon measured).
    linear_backend: str = rule("auto", one_of=("auto", "onednn", "torch"))


@dataclass
class DataConfig:
    # JSONL, Parquet or a local HF `datasets` directory; empty uses the prompts of `task`.
    path: str = ""
    # A built-in synthetic task (see rayrlhf.tasks.TASKS) supplying prompts, and for SFT and RM
    # demonstrations and preference pairs, when no dataset path is given.
    task: str = ""
    # A string, or a conversation: a list of {"role", "content"} messages (system turns too),
    # which always goes through the tokenizer's chat template.
    prompt_field: str = "prompt"
    # Wrap each string prompt in the tokenizer's chat template as a user turn.
    chat_template: bool = False
    max_prompt_tokens: int = rule(64, ge=1)
    # A prompt over max_prompt_tokens: error stops before any actor starts, naming it; drop
    # leaves it out (counted in the start-up log).
    overlong_prompts: str = rule("error", one_of=("error", "drop"))
    # Size of the built-in synthetic prompt set.
    synthetic_size: int = rule(2048, ge=1)


@dataclass
class RolloutConfig:
    # The rollout engine's implementation (rayrlhf.rollout.ENGINES).
    engine: str = rule("vllm", one_of=tuple(ENGINES))
    num_engines: int = rule(1, ge=1)
    cpus_per_engine: float = rule(1.0, gt=0)
    gpus_per_engine: float = rule(0.0, ge=0)
    tensor_parallel_size: int = rule(1, ge=1)
    max_new_tokens: int = rule(16, ge=1)
    temperature: float = rule(1.0, gt=0, why="training log-probs divide by it")
    top_p: float = rule(1.0, gt=0, le=1)
    top_k: int = -1
    repetition_penalty: float = rule(1.0, gt=0)
    # Strings that end a response (kept in it, so text and tokens agree).
    stop: list[str] = field(default_factory=list)
    # Responses sampled per prompt (the group of the critic-free estimators).
    n: int = rule(1, ge=1)
    # vLLM KV cache size on CPU (GiB, allocated at start-up: it counts in the engine's memory)
    # and memory fraction on GPU.
    kv_cache_gib: float = rule(1.0, gt=0)
    # KV cache block size in tokens; 0 keeps vLLM's (128 on CPU, 16 on GPU). vLLM's CPU attention
    # wants a multiple of 32: 32 generated the CPU bench point (contexts under 40 tokens) 5-9%
    # faster than 128.
    block_size: int = rule(0, ge=0)
    gpu_memory_utilization: float = 0.5
    # Engines that die during a run are started again (with the current weights) and the lost
    # work retried, up to this many restarts in the run.
    max_restarts: int = rule(3, ge=0)
    # GPU engines colocated with trainers: after sampling, release the KV cache and weights
    # (vLLM sleep mode) so training can use the memory; the weight sync restores them.
    sleep: bool = False
    # vLLM's enforce_eager. false captures CUDA graphs on GPU (much faster decoding of small
    # batches) and compiles the model on CPU (generation of the CPU bench model 10-30% faster,
    # for 40-75 s more start-up per engine on 2 cores); true starts in seconds.
    enforce_eager: bool = True
    # Multi-turn rollouts: an environment (rayrlhf.agent), path/to/file.py:ClassName or the built-in
    # `tools` (the tool calls of a turn answered by the functions of `tools`); empty: one response
    # per sample. Each turn is its own engine request of at most max_new_tokens.
    env: str = ""
    # Model turns per trajectory at most, and its response tokens (the model's and the
    # observations') at most; 0 is max_turns x max_new_tokens.
    max_turns: int = rule(4, ge=1)
    max_total_tokens: int = rule(0, ge=0)
    # Environment steps running at once in an engine; a step running past env_timeout_s fails.
    env_concurrency: int = rule(16, ge=1)
    env_timeout_s: float = rule(60.0, gt=0)
    # An environment that raises or times out: error stops the run naming the trajectory; skip
    # drops the trajectory from training and counts it (rollout/env_failures).
    env_errors: str = rule("error", one_of=("error", "skip"))
    # rollout.env=tools: a built-in tool set (calculator) or a Python file whose public functions are
    # the tools, and each call's time limit.
    tools: str = ""
    tool_timeout_s: float = rule(10.0, gt=0)


@dataclass
class FrozenWorkersConfig:
    """Frozen-model workers (the reference policy's and the reward's)."""
    num_workers: int = rule(1, ge=1)
    cpus_per_worker: float = rule(0.5, gt=0)
    gpus_per_worker: float = rule(0.0, ge=0)
    micro_batch_size: int = rule(64, ge=1)


@dataclass
class ReferenceConfig(FrozenWorkersConfig):
    # With a mergeable peft method on the actor: its ranks compute the reference's log-probs with
    # their adapters off, from the frozen base they hold (no reference workers, no second copy of
    # the model; with qlora the reference is the 4-bit base, the policy's start, not the checkpoint
    # in full precision).
    from_actor_base: bool = False


@dataclass
class RewardModelSpec:
    # HF sequence-classification reward model (one label), read at the last real token.
    path: str = MISSING
    weight: float = 1.0


@dataclass
class RewardFunctionSpec:
    # A built-in (rayrlhf.rewards.BUILTIN) or path/to/file.py[:name], as reward.function.
    function: str = MISSING
    weight: float = 1.0


@dataclass
class RemoteRewardSpec:
    # A `rayrlhf serve-rm` server, e.g. http://127.0.0.1:8000.
    url: str = MISSING
    weight: float = 1.0
    # Bearer token; use `${oc.env:VAR}` to read it from the environment instead of the file.
    token: str = ""


@dataclass
class RewardConfig(FrozenWorkersConfig):
    """The score of a response is the weighted sum of every configured source."""
    # A built-in function (see rayrlhf.rewards.BUILTIN) or `path/to/file.py[:name]` with
    # reward(prompts, responses, **fields) -> list[float]; empty or null for none.
    function: str | None = "alphabet"
    function_weight: float = 1.0
    # More functions, each with its weight (e.g. math at 1.0 and format at 0.1); with more than
    # one function each one's mean score is logged as reward/<function>.
    functions: list[RewardFunctionSpec] = field(default_factory=list)
    models: list[RewardModelSpec] = field(default_factory=list)
    remote: list[RemoteRewardSpec] = field(default_factory=list)
    remote_timeout_s: float = rule(30.0, gt=0)
    remote_retries: int = rule(2, ge=0)
    # Added to the score of responses cut at max_new_tokens (e.g. -1.0); 0 is off.
    truncated_penalty: float = 0.0
    # DAPO's soft overlong punishment: over the last `overlong_buffer` tokens before the length
    # limit (rollout.max_new_tokens; with an environment the trajectory's budget) the penalty grows
    # linearly from 0 to `overlong_penalty` at the limit, subtracted from the score; 0 is off.
    overlong_buffer: int = rule(0, ge=0)
    overlong_penalty: float = rule(1.0, ge=0)
    # Normalise scores over the batch (zero mean, unit variance), then clip to +-clip (0 is off).
    normalize: bool = False
    clip: float = rule(0.0, ge=0)
    # A sample whose reward is unusable (the function raised, gave the wrong count or NaN):
    # false stops the run naming it; true drops it from training and counts it in the metrics.
    skip_invalid: bool = False


@dataclass
class PeftConfig:
    # none: every parameter trains. lora; qlora: LoRA over the base stored in 4-bit (bitsandbytes,
    # computing in model.dtype); adalora: LoRA whose ranks are pruned by importance during training;
    # ia3: learnt scales of the target layers' outputs (inputs for feedforward_modules); prompt:
    # virtual token embeddings before the input; ptuning: the same from a small prompt encoder (P-tuning
    # v1); prefix: virtual keys and values in every layer from an MLP (prefix tuning); ptuning_v2: the
    # same learnt directly (P-tuning v2, deep prompt tuning).
    method: str = rule("none", one_of=PEFT_METHODS)
    # lora, qlora, adalora, ia3: the adapted linear layers.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # lora, qlora: the rank; adalora: the average rank it prunes down to, from init_rank.
    rank: int = rule(8, ge=1)
    alpha: float = rule(16.0, gt=0)
    dropout: float = rule(0.0, ge=0, lt=1)
    # qlora: 4-bit NormalFloat or float, and double quantization of the quantization constants.
    quant_type: str = rule("nf4", one_of=("nf4", "fp4"))
    double_quant: bool = True
    # adalora: starting rank; optimizer steps before pruning starts (tinit) and at the end with
    # ranks fixed (tfinal); steps between reallocations (deltaT); weight of the orthogonality
    # penalty on the singular vectors.
    init_rank: int = rule(12, ge=1)
    warmup_steps: int = rule(0, ge=0)
    final_steps: int = rule(0, ge=0)
    reallocate_every: int = rule(1, ge=1)
    orth_reg_weight: float = rule(0.5, ge=0)
    # ia3: the target modules whose input is scaled (the MLP's down projection, as in the paper).
    feedforward_modules: list[str] = field(default_factory=list)
    # prompt, ptuning, prefix, ptuning_v2: how many virtual tokens.
    virtual_tokens: int = rule(16, ge=1)
    # ptuning: the prompt encoder's hidden width and kind; prefix: the MLP's hidden width.
    encoder_hidden_size: int = rule(128, ge=1)
    encoder_type: str = rule("MLP", one_of=("MLP", "LSTM"))


@dataclass
class TrainerRoleConfig:
    # Data-parallel ranks, one Ray actor each.
    num_ranks: int = rule(1, ge=1)
    cpus_per_rank: float = rule(1.0, gt=0)
    gpus_per_rank: float = rule(0.0, ge=0)
    zero_stage: int = rule(2, one_of=(0, 1, 2, 3))
    lr: float = rule(1e-5, gt=0)
    # The learning rate over the role's optimizer steps: warmup_steps rising linearly from 0, then
    # constant, or linear or cosine down to min_lr_ratio x lr at the last step (trainer.lr_factor).
    lr_schedule: str = rule("constant", one_of=LR_SCHEDULES)
    warmup_steps: int = rule(0, ge=0)
    min_lr_ratio: float = rule(0.0, ge=0, le=1)
    weight_decay: float = rule(0.0, ge=0)
    grad_clip: float = rule(1.0, ge=0)
    micro_batch_size: int = rule(16, ge=1)
    # > 0: micro-batches of about this many real tokens instead of micro_batch_size rows, as
    # many on every rank, balanced by tokens (at least the longest sample).
    micro_batch_tokens: int = 0
    gradient_checkpointing: bool = False
    # torch.compile the model's transformer layers (inductor, dynamic shapes): the CPU bench's
    # train stage 17-18% faster in three of four in-process measurements, for 40-90 s of
    # compilation (the actor and critic compile during set-up, beside the engines' start-up;
    # torch caches it on disk). Not with ZeRO-3 partitioned weights.
    compile: bool = False
    peft: PeftConfig = field(default_factory=PeftConfig)


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
    eval_fraction: float = rule(0.1, gt=0, lt=1)
    # A string or a conversation, as data.prompt_field.
    prompt_field: str = "prompt"
    # SFT reads the response; reward-model training reads the chosen and rejected responses.
    response_field: str = "response"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # Wrap each string prompt in the tokenizer's chat template as a user turn.
    chat_template: bool = False
    # Longest prompt + response in tokens; a longer sample is truncated (its response cut) or
    # dropped, and counted either way.
    max_tokens: int = rule(128, ge=2)
    overlong: str = rule("truncate", one_of=("truncate", "drop"))
    # Rows of the built-in task's data (held-out rows are extra).
    synthetic_size: int = rule(2048, ge=1)


@dataclass
class SupervisedStageConfig(TrainerRoleConfig):
    """SFT or reward-model training: data-parallel DeepSpeed ranks on (prompt, response) data."""
    data: SupervisedDataConfig = field(default_factory=SupervisedDataConfig)
    # Model to start from; empty means model.path (SFT) or the SFT output / model.path (RM).
    model_path: str = ""
    epochs: int = rule(1, ge=1)
    # Stop after this many optimizer steps (0: run every epoch).
    max_steps: int = rule(0, ge=0)
    # Samples (SFT) or pairs (RM) per optimizer step, over all ranks.
    batch_size: int = rule(32, ge=1)
    # Held-out evaluation every N steps, and always at the end (0: only at the end).
    eval_every: int = rule(0, ge=0)
    # Full checkpoints (DeepSpeed states, RNG states, data position) every N steps under
    # output_dir/checkpoints, keeping the last `keep_checkpoints`; 0 is off. Resume with resume=true.
    checkpoint_every: int = rule(0, ge=0)
    keep_checkpoints: int = rule(2, ge=1)


@dataclass
class SFTConfig(SupervisedStageConfig):
    # Pack several short samples into each row (attention kept within a sample).
    packing: bool = False


@dataclass
class DPOConfig(SupervisedStageConfig):
    """Direct preference optimisation (and relatives) on (prompt, chosen, rejected) rows, as the
    reward-model stage reads them. The reference is the starting policy: the ranks compute its
    log-probs of every pair once, before their first step (see rayrlhf.supervised)."""
    # sigmoid (DPO), ipo, hinge (SLiC), simpo (reference-free, length-normalised, with a margin).
    loss: str = rule("sigmoid", one_of=PREFERENCE_LOSSES)
    beta: float = rule(0.1, gt=0)
    # The share of pairs taken as mislabelled (cDPO; sigmoid and simpo).
    label_smoothing: float = rule(0.0, ge=0, lt=0.5)
    # SimPO's target margin between the chosen and rejected length-normalised rewards.
    simpo_gamma: float = rule(0.5, ge=0)
    # Each pair's two responses follow one copy of its prompt in a row (the prompt computed once).
    packing: bool = False


@dataclass
class PipelineConfig:
    # Stages that run, in this order, each reading the previous one's checkpoint: [sft, rm, ppo] or a
    # part of it, or [sft, dpo] (DPO in place of the reward model and PPO).
    stages: list[str] = field(default_factory=lambda: ["sft", "rm", "ppo"])
    # Stages to run again although their outputs exist (the stages after them rerun too).
    rerun: list[str] = field(default_factory=list)
    # Weight of the trained reward model among the PPO reward sources.
    rm_weight: float = 1.0
    # Start the PPO critic from the trained reward model (as InstructGPT does).
    critic_from_rm: bool = True


@dataclass
class DynamicSamplingConfig:
    # DAPO's dynamic sampling: prompt groups whose rollout.n rewards (the sources' sum, before the
    # truncation and overlong penalties) are all equal teach nothing to a group estimator; they are
    # dropped, and more prompts are sampled until the step has trainer.prompts_per_step
    # informative groups.
    enable: bool = False
    # Each round samples oversample x prompts_per_step prompts (rounded up).
    oversample: float = rule(1.0, ge=1)
    # Rounds after the first at most. Still short then, the step trains on the informative groups
    # found (the rest of the batch masked out) and says so; with none at all the run stops.
    max_extra_rounds: int = rule(4, ge=0)


@dataclass
class AlgorithmConfig:
    # gae (PPO with a critic), grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, remax.
    estimator: str = rule("gae", one_of=ESTIMATORS)
    gamma: float = rule(1.0, ge=0, le=1)
    lam: float = rule(0.95, ge=0, le=1)
    # PPO clip range [1 - clip_eps, 1 + clip_eps_high]; clip_eps_high unset means clip_eps.
    clip_eps: float = rule(0.2, gt=0, lt=1)
    clip_eps_high: float | None = rule(None, gt=0)
    # Dual clip c > 1 caps the loss of negative-advantage tokens at c |A|; unset is off (ppo only).
    dual_clip: float | None = rule(None, gt=1)
    # ppo: the clipped surrogate; cispo: the clipped ratio as a stop-gradient weight on every
    # token's log-prob gradient (CISPO, MiniMax-M1), so clipping drops no token.
    policy_loss: str = rule("ppo", one_of=POLICY_LOSSES)
    # token: a ratio per token; sequence: GSPO's length-normalised ratio of the whole response,
    # clipped per response (its paper's clip range is ~3e-4 / 4e-4, with seq_mean_token_mean).
    ratio_level: str = rule("token", one_of=RATIO_LEVELS)
    # Leave responses cut at the length limit out of the loss (DAPO's overlong filtering); they still
    # count in their group's statistics.
    mask_truncated: bool = False
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    entropy_coef: float = rule(0.0, ge=0)
    # token_mean, seq_mean_token_mean or seq_mean_token_sum_norm (normalised by max_new_tokens).
    loss_agg: str = rule("token_mean", one_of=LOSS_AGGREGATIONS)
    # Value clipping range around the old values; 0 turns value clipping off.
    value_clip_eps: float = rule(0.2, ge=0)
    # KL to the reference: estimator k1/k2/k3, in the per-token reward or as a loss term.
    kl_estimator: str = rule("k1", one_of=KL_ESTIMATORS)
    kl_in: str = rule("reward", one_of=("reward", "loss"))
    # 0 with no KL anywhere: no reference actors are started.
    kl_coef: float = rule(0.05, ge=0)
    # Adaptive KL controller: a target KL per sequence; 0 keeps `kl_coef` fixed.
    kl_target: float = rule(0.0, ge=0)
    kl_horizon: int = rule(10000, ge=1)
    # Whitening of GAE advantages (REINFORCE++ always whitens; group estimators never).
    whiten_advantages: bool = True
    # Truncated importance sampling: weight each token by min(pi_old / pi_engine, tis_cap).
    tis_cap: float | None = rule(None, gt=0)
    ppo_epochs: int = rule(1, ge=1)
    # Prompts x samples per optimizer step; must divide the rollout batch.
    train_batch_size: int = rule(64, ge=1)
    # With one optimizer step per batch (ppo_epochs 1, train_batch_size = the batch) and no KL in
    # the reward, pi_old is the policy being trained: its log-probs come from the training forward
    # and the separate old-log-prob forward is skipped. true runs that forward anyway.
    recompute_old_logprobs: bool = False


@dataclass
class TrainerConfig:
    total_steps: int = rule(20, ge=1)
    # Prompts sampled per iteration.
    prompts_per_step: int = rule(64, ge=1)
    # Save the policy (HF format) every N steps; 0 saves only at the end.
    save_every: int = rule(0, ge=0)
    # Full checkpoints (trainer and optimizer states, KL controller, data position) every N
    # steps under output_dir/checkpoints, keeping the last `keep_checkpoints`; 0 is off.
    checkpoint_every: int = rule(0, ge=0)
    keep_checkpoints: int = rule(2, ge=1)
    # Asynchronous mode: the engines generate the next batches while the trainers train, up to
    # `max_staleness` weight updates behind (so off-policy by that much; algorithm.tis_cap
    # corrects for it). false: generate, then train, on-policy.
    async_rollout: bool = False
    max_staleness: int = 1


@dataclass
class EvalConfig:
    # Evaluate every N steps on held-out prompts (0: never).
    every: int = rule(0, ge=0)
    # Prompt file (same formats and fields as data); empty uses fresh built-in prompts.
    path: str = ""
    size: int = rule(64, ge=1)
    greedy: bool = True
    # A reward function that scores held-out responses beside the reward sources, logged as
    # eval/rule_score (e.g. a task's accuracy rule that training never sees); empty is none.
    function: str = ""
    # Also evaluate the starting policy, logged as step 0.
    before_training: bool = False


@dataclass
class WeightSyncConfig:
    bucket_mb: float = rule(64.0, gt=0)
    # shared_memory: through a /dev/shm file (CPU, every engine on actor rank 0's node);
    # cuda_ipc: through a buffer on the GPU an engine shares with an actor rank (colocated);
    # collective: a gloo/NCCL broadcast group; auto: the first of these that the placement allows.
    transport: str = rule("auto", one_of=WEIGHT_TRANSPORTS)
    # Compare engine and trainer log-probs of the sampled tokens every N steps (0: never).
    check_every: int = rule(1, ge=0)
    # A gap above this (mean absolute log-prob difference) is reported as a warning.
    warn_gap: float = 0.05
    timeout_s: float = rule(600.0, gt=0)


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RolePlacement:
    # PACK, SPREAD, STRICT_PACK or STRICT_SPREAD for this role's bundles; empty: ray.placement_strategy.
    strategy: str = rule("", one_of=("", *PLACEMENT_STRATEGIES))
    # Labels each node of the role's bundles must carry, e.g. {pool: rollout} for nodes started with
    # `ray start --labels pool=rollout`: which nodes a role may use, and where it goes if one is lost.
    node_labels: dict[str, str] = field(default_factory=dict)


@dataclass
class RolePlacements:
    rollout: RolePlacement = field(default_factory=RolePlacement)
    reference: RolePlacement = field(default_factory=RolePlacement)
    reward: RolePlacement = field(default_factory=RolePlacement)
    actor: RolePlacement = field(default_factory=RolePlacement)
    critic: RolePlacement = field(default_factory=RolePlacement)


@dataclass
class RayConfig:
    # Existing cluster address ("auto" under `ray job submit`); empty starts a local one.
    address: str = ""
    # Logical CPUs for a local cluster; more than the cores is fine (actors mostly wait).
    num_cpus: int = rule(8, ge=1)
    # Start the Ray dashboard with a local cluster, bound to 127.0.0.1 (port 8265) only; reach it
    # from elsewhere through an SSH tunnel, never by binding it to a public interface.
    dashboard: bool = False
    # Torch intra-op threads per actor.
    threads_per_actor: int = rule(1, ge=1)
    # Stream the actors' own logs (vLLM, DeepSpeed) to the console; they are always in Ray's log dir.
    log_to_driver: bool = False
    # How each role's bundles are placed: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD.
    placement_strategy: str = rule("PACK", one_of=PLACEMENT_STRATEGIES)
    # Per role (rollout, reference, reward, actor, critic): its strategy and the nodes it may use.
    roles: RolePlacements = field(default_factory=RolePlacements)
    # Groups of roles that share placement bundles, e.g. [[actor, reference, reward]]: bundle i
    # holds actor i of each role in the group and their cpus/gpus added up (0.5 GPU each puts two
    # roles on one GPU). Roles: rollout, reference, reward, actor, critic.
    colocate: list[list[str]] = field(default_factory=list)
    # Any remote call (generation, scoring, a training phase) taking longer is an error, not a hang.
    call_timeout_s: float = rule(3600.0, gt=0)
    # When a node is lost, how long (from its death, and at most while it stops answering) its rollout
    # engines may wait for Ray to place them on another node with room (an autoscaler may be adding
    # one) before the run stops, naming the checkpoint.
    node_loss_timeout_s: float = rule(300.0, gt=0)


@dataclass
class LoggingConfig:
    # TensorBoard event files under output_dir/tensorboard.
    tensorboard: bool = True
    # Weights & Biases; mode "offline" writes under output_dir/wandb without any network.
    wandb: bool = False
    wandb_project: str = "rayrlhf"
    wandb_mode: str = rule("offline", one_of=("offline", "online", "disabled"))
    # Samples of each step written to output_dir/samples.jsonl (prompt, response, reward,
    # truncated): what the policy says and what it earns, to read beside the curves; 0 is off.
    samples_per_step: int = rule(0, ge=0)


@dataclass
class BenchConfig:
    # Iterations per measured run; the first `warmup_steps` are left out of every figure.
    steps: int = rule(5, ge=1)
    warmup_steps: int = rule(2, ge=0)
    # Extra runs beside the configured one: other prompts per step, other response lengths.
    sweep_prompts: list[int] = rule(factory=list, each_ge=1)
    sweep_max_new_tokens: list[int] = rule(factory=list, each_ge=1)
    # Run Hugging Face TRL's GRPOTrainer on the configured point too (needs `pip install trl`).
    trl: bool = True
    # Peak FLOP/s of one training device (TFLOP/s) for model FLOPs utilisation; 0: unknown.
    peak_tflops: float = rule(0.0, ge=0)


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
    dpo: DPOConfig = field(default_factory=DPOConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


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
        moved = re.match(r"(\w+)\.lora\b", key)
        if moved:
            return (f"unknown config key '{key}': LoRA moved to {moved[1]}.peft (method=lora, and rank, "
                    "alpha, dropout, target_modules as before)")
        return f"unknown config key '{key}'"
    return f"bad value for config key '{key}': {reason}"


