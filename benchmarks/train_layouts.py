"""The PPO train stage under each batch layout, interleaved in one process so that they share
the machine's state (a shared 2-core VM drifts by tens of percent within minutes, which
separate runs cannot tell from a real difference).

One real DeepSpeed actor rank (`rayrlhf.trainer.TrainerWorker`, gloo with one rank, no Ray)
trains on GRPO-shaped batches of the config: `trainer.prompts_per_step` prompts of the task,
each with `rollout.n` responses of random tokens and random lengths in
[max_new_tokens / 2, max_new_tokens]. Round after round, the same batch is trained on in each
layout in turn:
- padded: prompts left-padded, responses right-padded (`actor.packing=false`);
- packed: samples end to end in rows (`actor.packing=true actor.share_prompts=false`);
- shared: packed, one copy of each prompt for its `rollout.n` responses (the default);
- shared+checkpointing: the same with gradient checkpointing (activations recomputed in the
  backward pass, for memory);
- shared+onednn_linear, shared+torch_linear: shared, with the linear layers' fp32 GEMMs on oneDNN
  (`rayrlhf.cpu_platform`) and on torch's own BLAS; the other layouts use the one `model.linear_backend`
  picks (auto: oneDNN on AMD CPUs, torch's elsewhere);
- shared+compiled: shared, on a second rank set up with `actor.compile=true` (the others run
  eager whatever the config says); its compilation happens in set-up, before the rounds. Its
  linear layers are the backend's that `model.linear_backend` picks (oneDNN's products are a
  custom op, which the compiled graphs call as they are).
It also times the optimizer step with and without DeepSpeed's all-reduce (one rank has nothing
to reduce) and torch's multi-tensor against its fused AdamW, on the model's parameters, and the
matrix products of the shared layout alone: each linear layer's forward and two backward products
over as many positions, on random operands, with the backend the shared layout used
(`products_alone`; `shared_products_share` is their share of the shared layout's time).
Reports median seconds per layout and the ratios to padded.

    PYTHONPATH=. python benchmarks/train_layouts.py --config conf/bench_cpu.yaml --rounds 8
"""

from __future__ import annotations

import os
import random
import statistics
import time

from benchmarks.interleaved import parse_args, report

LAYOUT_FLAGS = ("packing", "share_prompts", "gradient_checkpointing", "onednn_linear", "compile")
# name: flags, as LAYOUT_FLAGS names them; onednn_linear None is model.linear_backend's choice
LAYOUTS = {"padded": (False, False, False, None, False), "packed": (True, False, False, None, False),
           "shared": (True, True, False, None, False),
           "shared+checkpointing": (True, True, True, None, False),
           "shared+onednn_linear": (True, True, False, True, False),
           "shared+torch_linear": (True, True, False, False, False),
           "shared+compiled": (True, True, False, None, True)}


def main() -> None:
    args = parse_args(__doc__, "train_layouts.py")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from rayrlhf.algorithms import Sampling, response_mask
    from rayrlhf.batch import build_batch, prompt_groups, segment_sizes
    from rayrlhf.config import load_config
    from rayrlhf.cpu_platform import onednn_chosen, use_onednn_linear
    from rayrlhf.data import load_prompts
    from rayrlhf.driver import prepare_models
    from rayrlhf.trainer import TrainerWorker, free_port

    cfg = load_config(args.config, args.overrides)
    configured = onednn_chosen(cfg.model.linear_backend)
    layouts = {name: tuple(configured if flag is None else flag for flag in flags)
               for name, flags in LAYOUTS.items()}
    torch.set_num_threads(cfg.ray.threads_per_actor)
    tokenizer = prepare_models(cfg)
    prompts = load_prompts(cfg.data, tokenizer, cfg.seed)
    rng = random.Random(cfg.seed)
    n, longest = cfg.rollout.n, cfg.rollout.max_new_tokens

    def grpo_batch():
        chosen = rng.sample(prompts, cfg.trainer.prompts_per_step)
        prompt_ids = [p.token_ids for p in chosen for _ in range(n)]
        responses = [[rng.randrange(4, len(tokenizer)) for _ in range(rng.randint(longest // 2, longest))]
                     for _ in prompt_ids]
        batch = build_batch(prompt_ids, responses, tokenizer.pad_token_id)
        batch["mask"] = response_mask(batch["sequences"][:, batch.prompt_len:], batch["response_lengths"])
        batch["engine_logprobs"] = -torch.rand(batch["mask"].shape)
        batch["advantages"] = torch.randn(batch["mask"].shape)
        return batch

    samples = cfg.trainer.prompts_per_step * n
    workers = {}
    for compiled in (False, True):
        actor_cfg = cfg.actor.copy()
        actor_cfg.compile = compiled
        workers[compiled] = TrainerWorker("actor", 0, 1)
        workers[compiled].setup("127.0.0.1", free_port("127.0.0.1"), cfg.model.path, actor_cfg, samples,
                                cfg.model, cfg.seed, algo_cfg=cfg.algorithm,
                                sampling=Sampling.of(cfg.rollout), norm_len=longest)
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    for round_index in range(args.rounds):
        batch = grpo_batch()
        for name, (packing, share, checkpointing, onednn, compiled) in layouts.items():
            worker = workers[compiled]
            worker.cfg.packing, worker.cfg.share_prompts = packing, share
            use_onednn_linear(worker.module, onednn)
            if checkpointing:
                worker.module.gradient_checkpointing_enable()
            else:
                worker.module.gradient_checkpointing_disable()
            begin = time.perf_counter()
            worker.train(batch, seed=round_index, kl_coef=0.0)
            if round_index:  # the first round warms up every layout
                seconds[name].append(time.perf_counter() - begin)
        print(f"round {round_index + 1}/{args.rounds}", flush=True)

    mask = batch["attention_mask"]
    median = {name: statistics.median(times) for name, times in seconds.items()}
    result = {"config": args.config, "samples": samples, "rounds_timed": args.rounds - 1,
              "positions_per_batch": {"padded": mask.numel(), "packed": int(mask.sum()),
                                      "shared": sum(segment_sizes(batch, prompt_groups(batch)))},
              "layouts": {name: dict(zip(LAYOUT_FLAGS, flags, strict=True))
                          for name, flags in layouts.items()},
              "train_seconds_median": median,
              "train_ratio_to_padded": {name: m / median["padded"] for name, m in median.items()},
              "optimizer_step": optimizer_steps(workers[False], args.rounds)}
    products = products_alone(workers[False].module, result["positions_per_batch"]["shared"],
                              layouts["shared"][LAYOUT_FLAGS.index("onednn_linear")], args.rounds)
    result |= {"products_alone": products, "shared_products_share": products["seconds"] / median["shared"]}
    report(result, args.output)


def products_alone(model, positions: int, onednn: bool, rounds: int) -> dict[str, float]:
    """Median seconds of the forward product and both backward ones (dY W, dY^T X) of every linear
    layer under the LM head, over `positions` rows of random operands, and their rate."""
    import torch

    from rayrlhf.cpu_platform import onednn_linear

    def linear(x, weight):
        return onednn_linear(x, weight, None) if onednn else torch.nn.functional.linear(x, weight)

    weights = [m.weight.detach() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    operands = [(torch.randn(positions, w.shape[1]), torch.randn(positions, w.shape[0]), w) for w in weights]
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        for x, grad, weight in operands:
            linear(x, weight), linear(grad, weight.t()), linear(grad.t(), x.t())
        times.append(time.perf_counter() - begin)
    seconds = statistics.median(times[1:])
    flops = sum(3 * 2 * positions * w.numel() for w in weights)
    return {"seconds": seconds, "gflop_per_s": flops / seconds / 1e9,
            "backend": "onednn" if onednn else "torch"}


def optimizer_steps(worker, rounds: int) -> dict[str, float]:
    """Median seconds of one optimizer step: DeepSpeed's step with and without its all-reduce,
    and torch's AdamW multi-tensor against fused, alternating, on gradients of the model's size."""
    import torch

    params = [p for p in worker.module.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    times: dict[str, list[float]] = {"deepspeed_step_with_allreduce": [], "deepspeed_step": [],
                                     "adamw_foreach": [], "adamw_fused": []}
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for grad, c in zip(grads, copies, strict=True):
        c.grad = grad.clone()
    optimizers = {"adamw_foreach": torch.optim.AdamW(copies, lr=1e-6, foreach=True),
                  "adamw_fused": torch.optim.AdamW(copies, lr=1e-6, fused=True)}
    reduce = worker.engine.enable_backward_allreduce
    for _ in range(rounds):
        for name, allreduce in (("deepspeed_step_with_allreduce", True), ("deepspeed_step", False)):
            worker.engine.enable_backward_allreduce = allreduce
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()  # DeepSpeed's step clears them
            begin = time.perf_counter()
            worker.engine.step()
            times[name].append(time.perf_counter() - begin)
        for name, optimizer in optimizers.items():
            begin = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - begin)
    worker.engine.enable_backward_allreduce = reduce
    return {name: statistics.median(values[1:]) for name, values in times.items()}


if __name__ == "__main__":
    main()
