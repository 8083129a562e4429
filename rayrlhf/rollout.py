"""The rollout-engine interface: what the driver asks of an engine, whatever generates.

An engine is a Ray actor that samples responses with their log-probs and takes the actor's
weights by the transports of `weight_sync`. `rollout.engine` names the implementation
(`ENGINES`); vLLM's is `rayrlhf.vllm_engine.VLLMEngine`. Another engine (SGLang, a server) is one
new file with a class implementing these methods, and a line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

# rollout.engine -> "module:class", imported only by the run that uses it.
ENGINES = {"vllm": "rayrlhf.vllm_engine:VLLMEngine"}


@dataclass
class Sample:
    response_ids: list[int]
    logprobs: list[float]
    # False when the response hit max_new_tokens without EOS (truncated, not finished).
    finished: bool
    text: str
    # Multi-turn (rollout.env): 1 on the model's tokens, 0 on the observations appended between its
    # turns (their log-probs are 0); None when every token is the model's.
    action_mask: list[int] | None = None
    # The environment's step rewards summed, its metrics (turns, env_seconds, the environment's
    # own), and why it failed on this trajectory (with rollout.env_errors=skip) or None.
    env_reward: float = 0.0
    env_metrics: dict[str, float] = field(default_factory=dict)
    env_error: str | None = None


class RolloutEngine:
    """Constructed as `cls(model_path, tokenizer, rollout_cfg, dtype, seed, max_model_len)` on the
    engine's own resources (`rollout.cpus_per_engine`, `gpus_per_engine`).

    The log-probs an engine reports are those of the distribution it samples from, after the
    repetition penalty, temperature, top-k and top-p (algorithms.Sampling), which is what the
    trainer computes too. Calls run in the order they are sent: a weight load sent after a
    generation applies to the generations sent after it."""

    def generate(self, prompt_ids: list[list[int]], seeds: list[int] | None = None,
                 rows: list[dict] | None = None, greedy: bool = False) -> list[list[Sample]]:
        """`rollout.n` samples per prompt (one greedy response when `greedy`), token ids in and
        out. `seeds[i]` seeds prompt i's sampling, so a rollout is a function of (weights, prompt,
        seed) alone and a resumed run samples what the uninterrupted one did.

        With rollout.env, each sample is a trajectory of turns (agent.EpisodeRunner), each turn its
        own request: `rows[i]` is prompt i's {"prompt", "fields", "chat", "row"} (the dataset's prompt,
        other columns and row, and whether it went through the chat template)."""
        raise NotImplementedError

    # The weight transports (weight_sync): an engine joins one of them at start-up, then every
    # sync ends in receive_weights.

    def join_weight_sync(self, master_addr: str, port: int, first_rank: int, world_size: int,
                         backend: str, timeout_s: float) -> None:
        """Collective transport: every worker of the engine joins trainer rank 0's group, worker
        w at rank first_rank + w."""
        raise NotImplementedError

    def map_shared_weights(self, path: str, plan) -> None:
        """Shared-memory transport: maps the file trainer rank 0 writes each sync into (it holds
        the current weights when this is called)."""
        raise NotImplementedError

    def receive_weights(self, plan, ipc_handle: tuple | None = None) -> None:
        """Loads one sync's weights (laid out by `plan`): from the group or the mapped file, or,
        by CUDA IPC, from the buffer `ipc_handle` describes. An engine asleep wakes for them."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Releases the accelerator memory of the KV cache and the weights for colocated
        trainers, until the next receive_weights."""
        raise NotImplementedError


def response_budget(rollout_cfg) -> int:
    """Response tokens of a sample at most: max_new_tokens for one turn; with an environment,
    rollout.max_total_tokens (model and observation tokens of every turn), 0 meaning max_turns x
    max_new_tokens."""
    if not rollout_cfg.env:
        return rollout_cfg.max_new_tokens
    return rollout_cfg.max_total_tokens or rollout_cfg.max_turns * rollout_cfg.max_new_tokens


def engine_class(name: str) -> type[RolloutEngine]:
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
