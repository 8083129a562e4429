"""The LM head's share of the train stage, A/B in one process: log-probs (and their backward) of a
batch's response tokens through the fused path (algorithms._FusedHeadLogprobs), through the
chunked path of autograd ops with recompute (the path the sampling transforms take), through the
full logits of every token at once (the path before either), and the same matrix products alone
(the head's forward, its recompute and the two backward products, chunk by chunk, into kept
outputs) as the rate to hold the fused path to. Each variant runs round by round, interleaved.

The head is the config's model's (vocabulary and width), the hidden states random; `--tokens`
response tokens (default: the config's prompts_per_step x rollout.n x max_new_tokens).

    PYTHONPATH=. python benchmarks/logprob_path.py --config conf/bench_cpu_131k.yaml --rounds 6
"""

from __future__ import annotations

import statistics
import time

from benchmarks.interleaved import parse_args, report


def main() -> None:
    args = parse_args(__doc__, "logprob_path.py",
                      {"--tokens": {"type": int, "default": 0, "help": "response tokens (0: the config's)"}})
    import torch

    from rayrlhf import modeling
    from rayrlhf.algorithms import Sampling, chunked_logprobs, token_logprobs
    from rayrlhf.config import load_config
    from rayrlhf.driver import prepare_models

    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(cfg.ray.threads_per_actor)
    prepare_models(cfg)
    model = modeling.load_causal_lm(cfg.model.path, "float32")
    weight = model.get_output_embeddings().weight.detach().clone().requires_grad_(True)
    vocab, width = weight.shape
    count = args.tokens or cfg.trainer.prompts_per_step * cfg.rollout.n * cfg.rollout.max_new_tokens
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(count, width, generator=generator).requires_grad_(True)
    tokens = torch.randint(vocab, (count,), generator=generator)
    chunk = modeling._chunk_positions(model, hidden.device)

    def fused():
        chunked_logprobs(hidden, weight, tokens, Sampling(), chunk)[0].sum().backward()

    def autograd_chunks():
        head = lambda h: h @ weight.t()  # noqa: E731 - a function, not the weight: the general path
        chunked_logprobs(hidden, head, tokens, Sampling(), chunk)[0].sum().backward()

    def full_logits():
        token_logprobs((hidden @ weight.t()).float(), tokens).sum().backward()

    logits = torch.empty(chunk, vocab)
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros_like(weight)

    def products_alone():
        with torch.no_grad():
            for start in range(0, count, chunk):
                part = hidden[start:start + chunk]
                z = logits[:len(part)]
                torch.mm(part, weight.t(), out=z)  # forward
                torch.mm(part, weight.t(), out=z)  # recompute in backward
                torch.mm(z, weight, out=grad_hidden[start:start + chunk])
                grad_weight.addmm_(z.t(), part)

    variants = {"fused": fused, "autograd_chunks": autograd_chunks, "full_logits": full_logits,
                "products_alone": products_alone}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, run in variants.items():
            hidden.grad = weight.grad = None
            begin = time.perf_counter()
            run()
            if round_index:  # the first round warms up every variant
                seconds[name].append(time.perf_counter() - begin)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    flops = 4 * 2 * count * width * vocab
    report({"config": args.config, "tokens": count, "vocab": vocab, "hidden": width, "chunk_positions": chunk,
            "rounds_timed": args.rounds - 1, "median_s": median,
            "gflops_per_s": {name: flops / s / 1e9 for name, s in median.items()},
            "products_alone_over": {name: median["products_alone"] / s for name, s in median.items()}},
           args.output)


if __name__ == "__main__":
    main()
