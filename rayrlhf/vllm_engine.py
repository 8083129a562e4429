"""The vLLM rollout engine (rollout.engine=vllm): one vLLM `LLM` per Ray actor, in its process."""

from __future__ import annotations

import os

import torch

from rayrlhf import cpu_platform, weight_sync
from rayrlhf.rollout import RolloutEngine, Sample


class VLLMEngine(RolloutEngine):
    def __init__(self, model_path: str, tokenizer: str, rollout_cfg, dtype: str, seed: int,
                 max_model_len: int):
        # The engine runs in this process; its worker is this actor (see ENVIRONMENT notes).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.platforms import current_platform

        # On GPU the cache is sized by gpu_memory_utilization; the CPU's is what we ask for.
        kv_cache_bytes = None
        if current_platform.is_cpu():
            cpu_platform.keep_plain_linear_weights()  # weight syncs load in place
            kv_cache_bytes = int(rollout_cfg.kv_cache_gib * 2**30)

        self.cfg = rollout_cfg
        self.llm = LLM(model=model_path, tokenizer=tokenizer or model_path, dtype=dtype,
                       seed=seed, enforce_eager=rollout_cfg.enforce_eager, max_model_len=max_model_len,
                       block_size=rollout_cfg.block_size or None,
                       tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                       gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                       kv_cache_memory_bytes=kv_cache_bytes,
                       enable_sleep_mode=rollout_cfg.sleep,
                       # Log-probs of the distribution sampled from (after penalties, temperature,
                       # top-k and top-p), as the trainer computes them (algorithms.Sampling).
                       logprobs_mode="processed_logprobs")
        self.asleep = False

    def generate(self, prompt_ids: list[list[int]], seeds: list[int] | None = None,
                 greedy: bool = False) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = self.cfg
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

    # Each transport's receiving end lives in every vLLM worker (`collective_rpc`), so that with
    # tensor parallelism every worker process joins the group and loads its own shard.

    def join_weight_sync(self, master_addr: str, port: int, first_rank: int, world_size: int,
                         backend: str, timeout_s: float) -> None:
        self.llm.collective_rpc(_join, args=(master_addr, port, first_rank, world_size, backend, timeout_s))

    def map_shared_weights(self, path: str, plan) -> None:
        self.llm.collective_rpc(_map, args=(path, plan))

    def receive_weights(self, plan, ipc_handle: tuple | None = None) -> None:
        if self.asleep:  # memory for the weights first, for the KV cache once they are in
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(_receive, args=(plan, ipc_handle))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if not self.asleep:
            self.llm.sleep(level=2)  # level 2: the weights go too; the next sync brings them back
            self.asleep = True


def _join(worker, master_addr: str, port: int, first_rank: int, world_size: int, backend: str,
          timeout_s: float) -> None:
    group = weight_sync.join_group(master_addr, port, first_rank + worker.rank, world_size, backend,
                                   timeout_s)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    worker.rayrlhf_receiver = weight_sync.CollectiveReceiver(group, device)


def _map(worker, path: str, plan) -> None:
    worker.rayrlhf_shared = weight_sync.map_shared_file(path, weight_sync.shared_offsets(plan)[-1])
    worker.rayrlhf_receiver = weight_sync.BufferReceiver(worker.rayrlhf_shared)
    worker.rayrlhf_read_in_place = cpu_platform.read_packed_weights_in_place(worker, worker.rayrlhf_shared,
                                                                             plan)


def _receive(worker, plan, ipc_handle: tuple | None = None) -> None:
    receiver = worker.rayrlhf_receiver if ipc_handle is None else weight_sync.CudaIpcReceiver(ipc_handle)
    weights = receiver.weights(plan)
    if not cpu_platform.load_in_place(worker, weights):
        worker.reload_weights(weights_iterator=weights)
    receiver.loaded()
