"""fp32 linear layers through oneDNN on x86 CPUs, for the models we train and score with
(`model.linear_backend`).

On CPU, torch runs fp32 matmuls through its BLAS, MKL, whose fast code paths are Intel's: on
AMD CPUs it runs no faster than its AVX2 path, while oneDNN, which vLLM's CPU backend uses
too, runs AVX-512 there, about twice the GEMM throughput on the AMD EPYC measured. On Intel CPUs
MKL runs AVX-512 itself and was the faster of the two in every product of the train stage
(benchmarks/train_layouts.py measures both in one process). So `auto` picks oneDNN on AMD only.
The forward GEMM and both backward GEMMs go through oneDNN, in fp32. Every other call (GPU,
bf16, autocast, ZeRO-3 partitioned weights, and layers under torch.compile, whose inductor cannot
lower oneDNN's private op) is torch's own. The op is private to torch, so `available()` also
checks once per process that it runs and agrees with torch's linear; where not, the layers stay
torch's, with one line saying so.
"""

from __future__ import annotations

import functools
import platform

import torch


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


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.with_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _linear(grad_2d, weight.t()).view(x.shape)  # dY W
        if ctx.needs_input_grad[1]:
            grad_weight = _linear(grad_2d.t(), x.reshape(-1, x.shape[-1]).t())  # dY^T X
        if ctx.with_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(torch.nn.Linear):
    """nn.Linear whose fp32 CPU calls run on oneDNN; the same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 and x.dim() >= 2
                and x.numel() and not hasattr(self.weight, "ds_id")  # a ZeRO-3 partition
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return _LinearFunction.apply(x, self.weight, self.bias)
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
