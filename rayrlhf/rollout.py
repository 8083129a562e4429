"""The rollout worker: one vLLM engine per Ray actor, generating responses with their log-probs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rayrlhf import weight_sync


@dataclass
class Sample:
    response_ids: list[int]
    logprobs: list[float]
    # False when the response hit max_new_tokens without EOS (truncated, not finished).
    finished: bool
    text: str


class RolloutWorker:
    def __init__(self, model_path: str, tokenizer: str, rollout_cfg, dtype: str, seed: int,
                 max_model_len: int):
        # The engine runs in this process; its worker is this actor (see ENVIRONMENT notes).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout_cfg.kv_cache_gib))
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            weight_sync.keep_plain_linear_weights()  # weight syncs load in place (see weight_sync)

        self.cfg = rollout_cfg
        self.llm = LLM(model=model_path, tokenizer=tokenizer or model_path, dtype=dtype,
                       seed=seed, enforce_eager=rollout_cfg.enforce_eager, max_model_len=max_model_len,
                       block_size=rollout_cfg.block_size or None,
                       tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                       gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                       enable_sleep_mode=rollout_cfg.sleep,
                       # Log-probs of the distribution sampled from (after penalties, temperature,
                       # top-k and top-p), as the trainer computes them (algorithms.Sampling).
                       logprobs_mode="processed_logprobs")
        self.asleep = False

    def generate(self, prompt_ids: list[list[int]], seeds: list[int] | None = None,
                 greedy: bool = False) -> list[list[Sample]]:
        """`rollout.n` samples per prompt (one greedy response when `greedy`), with the sampled
        tokens' log-probs after temperature and the other sampling transforms."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = self.cfg
        # A seed per prompt makes a rollout a function of (weights, prompt, seed) alone, not of
        # the engine's history, so a resumed run samples what the uninterrupted one did.
        params = [SamplingParams(
            n=1 if greedy else cfg.n, max_tokens=cfg.max_new_tokens,
            temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            repetition_penalty=cfg.repetition_penalty, stop=list(cfg.stop) or None,
            include_stop_str_in_output=True, logprobs=0, seed=None if seeds is None else seeds[i],
        ) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                                    params, use_tqdm=False)
        return [[Sample(list(c.token_ids), [next(iter(lp.values())).logprob for lp in c.logprobs],
                        c.finish_reason != "length", c.text) for c in out.outputs]
                for out in outputs]

    def join_weight_sync(self, master_addr: str, port: int, first_rank: int, world_size: int,
                         backend: str, timeout_s: float) -> None:
        self.llm.collective_rpc(weight_sync.engine_join,
                                args=(master_addr, port, first_rank, world_size, backend, timeout_s))

    def map_shared_weights(self, path: str, plan) -> None:
        self.llm.collective_rpc(weight_sync.engine_map, args=(path, plan))

    def receive_weights(self, plan, ipc_handle: tuple | None = None) -> None:
        """The actor's weights (see weight_sync); an engine asleep gets memory for them first,
        and for its KV cache once they are in."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(weight_sync.engine_receive, args=(plan, ipc_handle))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Releases the GPU memory of the KV cache and the weights (vLLM sleep mode, level 2) for
        colocated trainers; the next weight sync brings the weights back."""
        if not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True
