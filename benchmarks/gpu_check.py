"""What only a GPU can show, in a few minutes, for a GPU machine lent through the device tool (one
GPU, PyTorch and transformers, no Ray, vLLM or DeepSpeed: so the checks call our modules directly).

1. The fused log-prob path in bf16 on CUDA against the full logits of a Qwen2.5-0.5B-shaped model
   (151,936-token vocabulary, tied head), forward and backward, and the peak memory of each.
2. Packed attention in bf16 (packed rows, shared prompts) against the padded layout, the grid's
   fully masked padding rows included: finite outputs and gradients.
3. The CUDA IPC weight transport between two processes on one GPU (weight_sync.CudaIpcSender ->
   CudaIpcReceiver): every weight arrives, and how fast.
4. The NCCL collective transport between two processes (weight_sync.Broadcaster): needs two GPUs,
   since NCCL refuses two ranks on one; with one the report says so.

    bash benchmarks/gpu_check.sh              # writes $OUT/gpu_check.md (else ./gpu_check.md)
    python benchmarks/gpu_check.py --smoke    # a small CPU run of check 1-2, to try the script here
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rayrlhf import modeling, weight_sync  # noqa: E402
from rayrlhf.algorithms import Sampling, response_mask  # noqa: E402
from rayrlhf.batch import build_batch  # noqa: E402

DEVICE = torch.device("cuda", 0)
SMOKE = False  # --smoke: small, on CPU


def qwen_like(folder: Path, layers: int = 4) -> str:
    """A random model of Qwen2.5-0.5B's widths (vocabulary 151,936, hidden 896, GQA 14/2, q/k/v
    biases, tied embeddings), `layers` deep."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=1 if SMOKE else layers, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return str(folder)


def sample_batch(vocab: int, samples: int = 16, prompt: int = 96, longest: int = 512):
    """GRPO-like groups of 4: shared prompts of uneven lengths, responses from 8 to `longest` tokens."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(vocab, (int(prompt * (0.5 + 0.5 * (i // 4) / (samples // 4))),),
                             generator=generator).tolist() for i in range(samples)]
    for i in range(samples):
        prompts[i] = prompts[i - i % 4]
    lengths = torch.linspace(8, longest, samples).long().tolist()
    responses = [torch.randint(vocab, (n,), generator=generator).tolist() for n in lengths]
    return modeling.to_device(build_batch(prompts, responses, pad_id=0), DEVICE)


def full_logits_logprobs(model, batch) -> torch.Tensor:
    """The path before the fused one: every position's logits, in fp32, then log_softmax."""
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["sequences"], attention_mask=mask,
                   position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits.float()
    start = batch.prompt_len - 1
    responses = batch["sequences"][:, batch.prompt_len:]
    logprobs = logits[:, start:-1].log_softmax(-1).gather(-1, responses[..., None])[..., 0]
    return logprobs * response_mask(responses, batch["response_lengths"])


def measured(fn):
    """fn()'s result, with the step's seconds and peak GPU memory (GiB) over what was held before."""
    if SMOKE:
        start = time.perf_counter()
        return fn(), time.perf_counter() - start, float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, (torch.cuda.max_memory_allocated() - before) / 2**30


def check_logprobs(model_path: str, lines: list[str]) -> None:
    model = modeling.load_causal_lm(model_path, "bfloat16").to(DEVICE)
    batch = sample_batch(model.config.vocab_size, *((4, 16, 32) if SMOKE else ()))
    sampling = Sampling(temperature=1.0)
    tokens = int(batch["response_lengths"].sum())

    def fwd_bwd(logprobs_of):
        model.zero_grad(set_to_none=True)
        logprobs = logprobs_of()
        logprobs.sum().backward()
        return logprobs.detach().float(), model.get_input_embeddings().weight.grad.float().clone()

    results = {}
    fused = functools.partial(modeling.policy_logprobs, model, batch, sampling)
    paths = {"full logits": lambda: full_logits_logprobs(model, batch), "fused": fused,
             "packed samples": lambda: fused("samples"), "packed prompts": lambda: fused("prompts")}
    for name, path in paths.items():
        fwd_bwd(path)  # warm-up
        results[name] = measured(lambda path=path: fwd_bwd(path))
    (ref, ref_grad), _, _ = results["full logits"]
    mask = response_mask(batch["sequences"][:, batch.prompt_len:], batch["response_lengths"]).bool()
    lines += ["## Log-probs in bf16 (fwd + bwd)", "",
              f"Qwen2.5-0.5B widths, {model.config.num_hidden_layers} layers, vocabulary "
              f"{model.config.vocab_size}; {len(batch)} samples, {tokens} response tokens.", "",
              "| path | seconds | peak GiB | max abs log-prob diff vs full | mean abs "
              "| tied-embedding grad rel. diff | finite |", "|---|---|---|---|---|---|---|"]
    for name, ((logprobs, grad), seconds, peak) in results.items():
        diff = (logprobs - ref)[mask].abs()
        grad_diff = ((grad - ref_grad).norm() / ref_grad.norm()).item()
        finite = bool(torch.isfinite(logprobs).all() and torch.isfinite(grad).all())
        lines.append(f"| {name} | {seconds:.3f} | {peak:.2f} | {diff.max().item():.4f} "
                     f"| {diff.mean().item():.5f} | {grad_diff:.4f} | {finite} |")
    lines.append("")


def _ipc_receiver(handle, plan, queue) -> None:
    try:
        receiver = weight_sync.CudaIpcReceiver(handle)
        start = time.perf_counter()
        sums = {name: tensor.double().sum().item() for name, tensor in receiver.weights(plan)}
        receiver.loaded()
        queue.put((sums, time.perf_counter() - start))
    except Exception:  # noqa: BLE001 - reported by the parent
        queue.put(traceback.format_exc())


def check_cuda_ipc(model_path: str, lines: list[str]) -> None:
    model = modeling.load_causal_lm(model_path, "bfloat16").to(DEVICE)
    plan = weight_sync.plan_buckets(weight_sync.parameter_specs(model), 256 << 20)
    sender = weight_sync.CudaIpcSender(DEVICE)
    start = time.perf_counter()
    sent, handle = sender.send(model, plan)
    written = time.perf_counter() - start
    expected = {name: tensor.double().sum().item() for name, tensor in model.state_dict().items()}
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_ipc_receiver, args=(handle, plan, queue))
    child.start()
    answer = queue.get(timeout=300)
    child.join(timeout=60)
    sender.release()
    lines += ["## CUDA IPC between two processes", ""]
    if isinstance(answer, str):
        lines += ["FAILED:", "```", answer, "```", ""]
        return
    sums, read = answer
    wrong = [name for name, total in sums.items() if name in expected and abs(total - expected[name]) > 1e-6 *
             max(1.0, abs(expected[name]))]
    lines += [f"{sent / 2**30:.2f} GiB in {len(plan)} buckets: written {written:.3f} s "
              f"({sent / written / 2**30:.1f} GiB/s), read by the other process {read:.3f} s; "
              f"{len(sums)} weights received, {len(wrong)} differing from the sender's "
              f"{wrong[:5] if wrong else ''}", ""]


def _nccl_rank(rank: int, port: int, queue) -> None:
    try:
        torch.cuda.set_device(rank)
        group = weight_sync.join_group("127.0.0.1", port, rank, 2, "nccl", 120)
        flat = torch.arange(1 << 26, dtype=torch.bfloat16, device=f"cuda:{rank}") if rank == 0 else \
            torch.empty(1 << 26, dtype=torch.bfloat16, device=f"cuda:{rank}")
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.distributed.broadcast(flat, src=0, group=group)
        torch.cuda.synchronize()
        queue.put((rank, time.perf_counter() - start, flat[-1].item()))
    except Exception:  # noqa: BLE001 - reported by the parent
        queue.put((rank, traceback.format_exc(), None))


def check_nccl(lines: list[str]) -> None:
    lines += ["## NCCL broadcast between two processes", ""]
    if torch.cuda.device_count() < 2:
        lines += [f"Not run: {torch.cuda.device_count()} GPU visible; NCCL refuses two ranks on one GPU.", ""]
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=_nccl_rank, args=(rank, port, queue)) for rank in range(2)]
    for process in ranks:
        process.start()
    answers = sorted(queue.get(timeout=300) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    lines += [f"rank {rank}: {took if isinstance(took, str) else f'{took:.4f} s'}, last element {last}"
              for rank, took, last in answers] + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="checks 1-2 small, on CPU")
    args = parser.parse_args()
    global DEVICE, SMOKE
    if args.smoke:
        DEVICE, SMOKE = torch.device("cpu"), True
    where = "CPU (smoke run)" if SMOKE else torch.cuda.get_device_name(0)
    lines = ["# GPU check", "", f"{where}, torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        path = qwen_like(Path(tmp) / "model")
        checks = [lambda: check_logprobs(path, lines)]
        if not SMOKE:
            checks += [lambda: check_cuda_ipc(path, lines), lambda: check_nccl(lines)]
        for check in checks:
            try:
                check()
            except Exception:  # noqa: BLE001 - one check's failure must not hide the others
                lines += ["FAILED:", "```", traceback.format_exc(), "```", ""]
            print("\n".join(lines), flush=True)
            if not SMOKE:
                torch.cuda.empty_cache()
    Path(args.out, "gpu_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
