"""The engine side of a CPU weight sync, A/B in one process: vLLM's layer-by-layer
`reload_weights` against the in-place load the rollout engines use (the model's `load_weights`
into the kept plain weights, then vLLM's own packing of each layer; `rayrlhf.weight_sync`),
alternating round by round on the same weights, beside one memory copy of the same bytes.

One real vLLM engine (`rayrlhf.vllm_engine.VLLMEngine`, in this process, no Ray) of the config's
model reads the weights from a shared-memory file written as trainer rank 0 writes it. Reports
the median milliseconds of each load and of the copy, and each load's ratio to the copy.
Interleaving matters here: a shared 2-core VM drifts by tens of percent within minutes.

    PYTHONPATH=. python benchmarks/weight_load.py --config conf/bench_cpu.yaml --rounds 8
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from benchmarks.interleaved import parse_args, report


def main() -> None:
    args = parse_args(__doc__, "weight_load.py")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch

    from rayrlhf import cpu_platform, weight_sync
    from rayrlhf.config import load_config
    from rayrlhf.driver import prepare_models
    from rayrlhf.modeling import load_causal_lm
    from rayrlhf.vllm_engine import VLLMEngine

    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(cfg.ray.threads_per_actor)
    prepare_models(cfg)
    engine = VLLMEngine(cfg.model.path, cfg.model.tokenizer, cfg.rollout, cfg.model.dtype, cfg.seed,
                           cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    policy = load_causal_lm(cfg.model.path, cfg.model.dtype)
    bucket_bytes = int(cfg.weight_sync.bucket_mb * 2**20)
    plan = weight_sync.plan_buckets(weight_sync.parameter_specs(policy), bucket_bytes)
    path, shared = weight_sync.create_shared_file(plan)
    engine.map_shared_weights(path, plan)
    os.unlink(path)
    nbytes = weight_sync.SharedMemorySender(shared).send(policy, plan)[0]

    def timed(load):
        def run(worker) -> float:
            begin = time.perf_counter()
            load(worker, weight_sync.shared_weights(worker.rayrlhf_shared, plan))
            return time.perf_counter() - begin
        return run

    def vllm_reload(worker, weights) -> None:
        worker.reload_weights(weights_iterator=weights)

    def in_place(worker, weights) -> None:
        if not cpu_platform.load_in_place(worker, weights):
            sys.exit("weight_load.py: error: this engine cannot load in place (cpu_platform.load_in_place)")

    loads = {"vllm_reload_weights": timed(vllm_reload), "in_place": timed(in_place)}
    src = torch.empty(nbytes // 4).normal_()
    dst = torch.empty_like(src)
    seconds: dict[str, list[float]] = {name: [] for name in (*loads, "memcpy")}
    for round_index in range(args.rounds):
        for name, load in loads.items():
            elapsed = engine.llm.collective_rpc(load)[0]
            if round_index:  # the first round warms up both
                seconds[name].append(elapsed)
        begin = time.perf_counter()
        dst.copy_(src)
        if round_index:
            seconds["memcpy"].append(time.perf_counter() - begin)
    median_ms = {name: statistics.median(values) * 1000 for name, values in seconds.items()}
    result = {"config": args.config, "bytes": nbytes, "rounds_timed": args.rounds - 1, "median_ms": median_ms,
              "times_memcpy": {name: median_ms[name] / median_ms["memcpy"] for name in loads}}
    report(result, args.output)


if __name__ == "__main__":
    main()
