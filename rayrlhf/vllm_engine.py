"""The vLLM rollout engine (rollout.engine=vllm): one vLLM `LLM` per Ray actor, in its process."""

from __future__ import annotations

import itertools
import os

import torch

from rayrlhf import agent, cpu_platform, weight_sync
from rayrlhf.cluster import NODE_SLOT_ENV
from rayrlhf.rollout import RolloutEngine, Sample


class VLLMEngine(RolloutEngine):
    def __init__(self, model_path: str, tokenizer: str, rollout_cfg, dtype: str, seed: int,
                 max_model_len: int):
        # The engine runs in this process; its worker is this actor (see ENVIRONMENT notes).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.platforms import current_platform

        # On GPU the cache is sized by gpu_memory_utilization; the CPU's is what we ask for.
        kv_cache_bytes, cpu_options = None, {}
        if current_platform.is_cpu():
            # Weight syncs load in place, in every worker (see vllm_worker).
            cpu_options["worker_extension_cls"] = "rayrlhf.vllm_worker.VLLMWorker"
            kv_cache_bytes = int(rollout_cfg.kv_cache_gib * 2**30)
            # A prompt prefilled in chunks has its sampled token discarded by rewinding the request's
            # generator, which a seeded request's CPU generator cannot do (vLLM raises "CPU Generator
            # does not use offset"): whole prefills only. Multi-turn rollouts hit it (long prompts
            # arriving mid-decode); so could long single-turn prompts.
            cpu_options |= {"enable_chunked_prefill": False,
                            "max_num_batched_tokens": max(max_model_len, 4096)}
            if rollout_cfg.tensor_parallel_size > 1:
                # The user's binding wins (their own in the actor's environment).
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_platform.tensor_parallel_cores(
                    rollout_cfg.tensor_parallel_size, rollout_cfg.cpus_per_engine,
                    int(os.environ.get(NODE_SLOT_ENV, "0"))))

        self.cfg = rollout_cfg
        self.llm = LLM(model=model_path, tokenizer=tokenizer or model_path, dtype=dtype,
                       seed=seed, enforce_eager=rollout_cfg.enforce_eager, max_model_len=max_model_len,
                       block_size=rollout_cfg.block_size or None,
                       tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                       # Worker processes of its own: Ray's executor would place them outside the
                       # engine's bundle, in placement groups of their own.
                       distributed_executor_backend="mp" if rollout_cfg.tensor_parallel_size > 1 else None,
                       gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                       kv_cache_memory_bytes=kv_cache_bytes,
                       enable_sleep_mode=rollout_cfg.sleep,
                       # Log-probs of the distribution sampled from (after penalties, temperature,
                       # top-k and top-p), as the trainer computes them (algorithms.Sampling).
                       logprobs_mode="processed_logprobs", **cpu_options)
        self.asleep = False
        self.episodes = None
        self.turn_ids = itertools.count()
        if rollout_cfg.env:
            self.episodes = agent.EpisodeRunner(rollout_cfg, agent.environment_class(rollout_cfg),
                                                self.llm.get_tokenizer())

    def generate(self, prompt_ids: list[list[int]], seeds: list[int] | None = None,
                 rows: list[dict] | None = None, greedy: bool = False) -> list[list[Sample]]:
        from vllm.inputs import TokensPrompt

        if self.episodes is not None:
            return self.episodes.run(_VLLMTurns(self), prompt_ids, rows, seeds, greedy)
        params = [self.sampling_params(1 if greedy else self.cfg.n, self.cfg.max_new_tokens,
                                       None if seeds is None else seeds[i], greedy)
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                                    params, use_tqdm=False)
        return [[Sample(t.token_ids, t.logprobs, t.finished, t.text) for t in map(_turn, out.outputs)]
                for out in outputs]

    def sampling_params(self, n: int, max_tokens: int, seed: int | None, greedy: bool):
        from vllm import SamplingParams

        cfg = self.cfg
        return SamplingParams(
            n=n, max_tokens=max_tokens, temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty, stop=list(cfg.stop) or None,
            include_stop_str_in_output=True, logprobs=0, seed=seed)

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


def _turn(completion) -> agent.Turn:
    """A vLLM completion as a turn: its tokens, their log-probs, whether it ended before the limit."""
    logprobs = [next(iter(lp.values())).logprob for lp in completion.logprobs]
    finished = completion.finish_reason != "length"
    return agent.Turn(list(completion.token_ids), logprobs, finished, completion.text)


class _VLLMTurns(agent.EngineTurns):
    """One request per turn, through the engine's continuous batching (requests added to the
    LLMEngine, which is stepped here; outputs come back under the ids given)."""

    def __init__(self, engine: VLLMEngine):
        self.engine = engine

    def submit(self, token_ids: list[int], max_tokens: int, seed: int, greedy: bool) -> str:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = self.engine.sampling_params(1, max_tokens, seed, greedy)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        request_id = f"turn-{next(self.engine.turn_ids)}"
        self.engine.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=token_ids), params)
        return request_id

    def step(self) -> list[tuple[str, agent.Turn]]:
        return [(out.request_id, _turn(out.outputs[0])) for out in self.engine.llm.llm_engine.step()
                if out.finished]

    def busy(self) -> bool:
        return self.engine.llm.llm_engine.has_unfinished_requests()

    def abort(self, request_ids: list[str]) -> None:
        self.engine.llm.llm_engine.abort_request(request_ids)


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
