"""The CPU platform's speed-ups, in one place. Each is an optimisation, never a requirement: it applies
only where it helps and has been checked, and otherwise falls back (saying so, once) to the general
path, which GPU nodes always take.

1. oneDNN linear layers for the models we train and score (`model.linear_backend`). On CPU, torch
runs fp32 matmuls through its BLAS, MKL, whose fast code paths are Intel's: on AMD CPUs it runs no
faster than its AVX2 path, while oneDNN, which vLLM's CPU backend uses too, runs AVX-512 there,
about twice the GEMM throughput on the AMD EPYC measured. On Intel CPUs MKL runs AVX-512 itself and
was the faster of the two in every product of the train stage (benchmarks/train_layouts.py measures
both in one process). So `auto` picks oneDNN on AMD only. The forward GEMM and both backward GEMMs
go through oneDNN, in fp32, as a custom op that torch.compile keeps as it is in compiled layers. Every
other call (GPU, bf16, autocast, ZeRO-3 partitioned weights) is torch's own. The op is private to
torch, so `available()` also checks once per process that it runs and agrees with
torch's linear; where not, the layers stay torch's, with one line saying so.

2. vLLM's CPU backend: weight syncs that load in place. vLLM's CPU backend packs each linear layer's
weight into oneDNN's blocked layout and drops the plain tensor, so a new weight can only come in
through its layer-by-layer reload: every layer's tensors allocated afresh, loaded, re-packed, copied
back (most of a sync's time). A worker that loads its model after `keep_plain_linear_weights` (each
of an engine's, see vllm_worker) keeps the plain weights, so a sync loads into them with the model's
own `load_weights` and re-packs each layer with vLLM's own packing: the same result, without the
allocations and the bookkeeping (and, with tied embeddings in tensor-parallel workers, right where
vLLM 0.32's reload left the head's packed copy stale: a log-prob gap of 1e-3 after a sync). With the
shared-memory file mapped, the plain weights of the packed layers that compute from their packed
copy alone are views of the file itself (`read_packed_weights_in_place`), so a sync re-packs
straight from it and loads only the rest.

This patches a private vLLM function, so it applies only to the vLLM versions it was checked on
(`CHECKED_VLLM`) and where that function has the signature it expects; elsewhere the engine keeps
vLLM's behaviour (one line says so) and vLLM's reload serves the syncs. GPU engines never call it.
"""

from __future__ import annotations

import functools
import inspect
import os
import platform
from collections.abc import Iterator

import torch

from rayrlhf.weight_sync import ParamSpec, shared_weights

# 1. oneDNN linear layers


@functools.cache
def available() -> bool:
    if not (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((3, 16), (8, 16), (8,)))
    try:
        works = torch.allclose(_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias),
                               rtol=1e-4, atol=1e-5)
    except RuntimeError as err:
        works, why = False, f"{type(err).__name__}: {str(err).splitlines()[0]}"
    else:
        why = "its results differ from torch's linear"
    if not works:
        print(f"model.linear_backend: oneDNN's linear cannot be used here ({why}); torch's linear "
              "layers are kept", flush=True)
    return works


def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD"), or "" where /proc/cpuinfo has none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_chosen(backend: str) -> bool:
    """Whether `model.linear_backend` (auto, onednn or torch) puts this process's linear layers
    on oneDNN; each actor decides on its own CPU."""
    if backend == "torch" or not available():
        return False
    return backend == "onednn" or cpu_vendor() == "AuthenticAMD"


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN (strided operands are read in place)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# A custom op, so that torch.compile keeps it whole in the graphs it builds (as an opaque call) and
# fuses what lies between the products; its backward's two products are calls of it too.
@torch.library.custom_op("rayrlhf::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN, for a 2-D x."""
    return _linear(x, weight, bias)


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _save_for_backward(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.with_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad_out, weight.t(), None)  # dY W
    if ctx.needs_input_grad[1]:
        grad_weight = onednn_linear(grad_out.t(), x.t(), None)  # dY^T X
    if ctx.with_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_out.sum(0)
    return grad_x, grad_weight, grad_bias


onednn_linear.register_autograd(_backward, setup_context=_save_for_backward)


class OneDNNLinear(torch.nn.Linear):
    """nn.Linear whose fp32 CPU calls run on oneDNN; the same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 and x.dim() >= 2
                and x.numel() and not hasattr(self.weight, "ds_id")  # a ZeRO-3 partition
                and not torch.is_autocast_enabled("cpu")):
            # 2-D through the op, reshaped outside it: oneDNN returns a 3-D result as a view, which
            # a custom op may not return (and AdaLoRA's layers add their update to the base
            # layer's output in place).
            out = onednn_linear(x.flatten(0, -2), self.weight, self.bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        return super().forward(x)


def use_onednn_linear(model: torch.nn.Module, enabled: bool = True) -> int:
    """Makes every plain nn.Linear of `model` a OneDNNLinear (back, when not `enabled`) where
    oneDNN is available; returns how many layers were switched."""
    if not available():
        return 0
    source, target = (torch.nn.Linear, OneDNNLinear) if enabled else (OneDNNLinear, torch.nn.Linear)
    switched = [m for m in model.modules() if type(m) is source]
    for module in switched:
        module.__class__ = target
    return len(switched)


# 2. vLLM's CPU backend: in-place weight loads

# vLLM releases whose CPU packing `keep_plain_linear_weights` was checked against (the weight-sync
# tests load in place on each and compare the engine's log-probs with transformers').
CHECKED_VLLM = ("0.32.",)


def keep_plain_linear_weights() -> None:
    """Makes vLLM's CPU linear-layer packing keep each plain weight (call before the engine
    loads its model, in the process that loads it)."""
    import vllm
    from vllm.model_executor.layers import utils

    pack = getattr(utils, "dispatch_cpu_unquantized_gemm", None)
    if pack is not None and hasattr(pack, "original"):
        return
    if (pack is None or not vllm.__version__.startswith(CHECKED_VLLM)
            or "remove_weight" not in inspect.signature(pack).parameters):
        checked = ", ".join(version.rstrip(".") for version in CHECKED_VLLM)
        print(f"weight sync: in-place loads are checked on vLLM {checked}'s CPU packing, not on vLLM "
              f"{vllm.__version__}'s; the engine loads each sync through vLLM's reload", flush=True)
        return

    def pack_keeping_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        pack(layer, remove_weight=False)
        # A 3-D (convolution) weight is packed in place, so it cannot be loaded into again.
        layer.rayrlhf_repack = layer.weight.dim() == 2 and not layer.weight.is_meta

    pack_keeping_weight.original = pack
    utils.dispatch_cpu_unquantized_gemm = pack_keeping_weight


def _in_place_packing(worker):
    """vLLM's CPU packing function where a sync can load in place (see `load_in_place`), else None."""
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    pack = getattr(getattr(utils, "dispatch_cpu_unquantized_gemm", None), "original", None)
    modules = list(worker.get_model().modules())
    plain_methods = (type(None), UnquantizedLinearMethod, UnquantizedEmbeddingMethod)
    if (pack is None or worker.model_config.quantization is not None
            or not all(type(getattr(m, "quant_method", None)) in plain_methods for m in modules)
            or not all(getattr(m, "rayrlhf_repack", True) for m in modules)):
        return None
    return pack


def read_packed_weights_in_place(worker, shared: torch.Tensor, plan: list[list[ParamSpec]]) -> set[str]:
    """Makes each packed layer's plain weight a view of its bytes in the mapped file, where the
    file holds them in the engine's layout: one HF weight, or the HF weights vLLM stacks into one
    (q, k, v; gate, up), side by side in that order. Returns the HF names now read in place.

    Only layers that compute from their packed copy alone are given views (see
    `_computes_from_packed_copy`), so what the engine computes never depends on the file: the
    trainer may write it (or its optimizer update it) at any time, and only re-packing, once a
    sync has written the whole file, reads the views."""
    if _in_place_packing(worker) is None:
        return set()
    model = worker.get_model()
    views = dict(shared_weights(shared, plan))
    stacked = getattr(model, "packed_modules_mapping", {})
    looked_up = _looked_up_weights(model)
    read_in_place: set[str] = set()
    for name, layer in model.named_modules():
        if (not getattr(layer, "rayrlhf_repack", False) or id(layer.weight) in looked_up
                or not _computes_from_packed_copy(layer)):
            continue
        prefix, _, leaf = name.rpartition(".")
        hf_names = [f"{prefix}.{part}.weight".lstrip(".") for part in stacked.get(leaf, [leaf])]
        parts = [views.get(hf_name) for hf_name in hf_names]
        if any(part is None or part.dtype != layer.weight.dtype for part in parts):
            continue
        first, rows = parts[0], sum(part.shape[0] for part in parts)
        side_by_side = all(a.data_ptr() + a.numel() * a.element_size() == b.data_ptr()
                           for a, b in zip(parts, parts[1:], strict=False))
        if not side_by_side or (rows, *first.shape[1:]) != tuple(layer.weight.shape):
            continue
        layer.weight.data = first.as_strided((rows, *first.shape[1:]), first.stride())
        read_in_place.update(hf_names)
    return read_in_place


def _looked_up_weights(model: torch.nn.Module) -> set[int]:
    """ids of the weights that embedding lookups read as they are (with tied embeddings, the LM
    head's weight too), never through a packed copy."""
    return {id(m.weight) for m in _input_embeddings(model)}


def _input_embeddings(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's vocabulary embeddings other than its LM heads."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    return [m for m in model.modules()
            if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]


@torch.no_grad()
def _computes_from_packed_copy(layer: torch.nn.Module) -> bool:
    """Whether the layer's products depend on its packed copy only, never on the memory of its
    plain weight. A layer whose packing fell back to torch's linear reads the plain weight (vLLM's
    CPU kernels depend on the CPU, dtype and shape), so this is measured, not assumed: the plain
    weight is negated in place (exactly undone) and the layer must give the same non-zero output
    before and after."""
    method = getattr(layer, "quant_method", None)
    if method is None:
        return False
    weight = layer.weight
    x = torch.randn(2, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
    before = method.apply(layer, x)
    weight.neg_()
    try:
        after = method.apply(layer, x)
    finally:
        weight.neg_()
    return bool(before.abs().sum() > 0) and torch.equal(before, after)


def load_in_place(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> bool:
    """Loads `weights` into the kept plain weights (skipping those read in place) and re-packs
    every packed layer. Returns False, having read nothing, where vLLM's reload is needed instead:
    an engine that did not keep its plain weights (GPU engines, or a vLLM version not checked),
    a quantized model, or layers whose loaded weights vLLM transforms in other ways."""
    pack = _in_place_packing(worker)
    if pack is None:
        return False
    read_in_place = getattr(worker, "rayrlhf_read_in_place", set())
    model = worker.get_model()
    model.load_weights((name, tensor) for name, tensor in weights if name not in read_in_place)
    unused = _unused_packed_copies(model)
    for layer in model.modules():
        if hasattr(layer, "rayrlhf_repack") and layer not in unused:
            pack(layer, remove_weight=False)
    return True


def _unused_packed_copies(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Input embeddings, whose packed copy (vLLM packs every embedding as if it were a head) nothing
    computes with: the lookup reads the plain weight. Re-packing a 131k x 256 one took 40 ms of a
    105 ms sync; with tied embeddings the LM head's own copy is re-packed all the same."""
    head = getattr(model, "lm_head", None)
    return [m for m in _input_embeddings(model) if m is not head]


# 3. vLLM's CPU tensor parallelism: the workers' cores


def tensor_parallel_cores(tp: int, cpus_per_engine: float, slot: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for an engine of `tp` CPU workers ("0|1": worker w's cores): the
    engine's `cpus_per_engine` split evenly over its workers, at least one core each, the engines of
    a node (`slot`: which of them this is) on cores of their own while the node has enough. vLLM's
    own choice binds one worker per NUMA node and refuses to start where there are fewer nodes
    than workers (most machines, for tp 2 or more)."""
    cores = sorted(os.sched_getaffinity(0))
    per_worker = max(1, int(cpus_per_engine) // tp)
    first = slot * tp * per_worker
    return "|".join(",".join(str(cores[(first + w * per_worker + i) % len(cores)]) for i in range(per_worker))
                    for w in range(tp))
