"""fp32 linear layers through oneDNN: the same outputs and gradients as torch's own linear."""

from pathlib import Path

import pytest
import torch

from rayrlhf.cpu_platform import OneDNNLinear, available, use_onednn_linear

pytestmark = pytest.mark.skipif(not available(), reason="oneDNN linear needs an x86 CPU build of torch")


def _grads(layer: torch.nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_(x.requires_grad)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = tuple(t.grad for t in (x, layer.weight, layer.bias) if t is not None and t.requires_grad)
    layer.zero_grad(set_to_none=True)
    return (out.detach(), *grads)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_match_torch_linear(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 24, bias=bias)
    x = torch.randn(3, 7, 48, requires_grad=True)
    expected = _grads(layer, x)
    assert use_onednn_linear(layer) == 1 and type(layer) is OneDNNLinear
    got = _grads(layer, x)
    assert len(got) == len(expected) == (4 if bias else 3)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_the_output_takes_in_place_updates():
    """Layers that wrap a linear one may add to its output in place (peft's AdaLoRA does); the
    gradients are those of the same update on torch's output."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(16, 8), torch.randn(2, 5, 16, requires_grad=True)
    update = torch.randn(2, 5, 8)

    def run():
        out = layer(x)
        out += update
        (out ** 2).sum().backward()
        grads = x.grad.clone(), layer.weight.grad.clone()
        x.grad, layer.weight.grad, layer.bias.grad = None, None, None
        return grads

    expected = run()
    use_onednn_linear(layer)
    for g, e in zip(run(), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_frozen_weight_and_input_get_no_gradient():
    layer = torch.nn.Linear(16, 8)
    use_onednn_linear(layer)
    layer.weight.requires_grad_(False)
    layer(torch.randn(5, 16)).sum().backward()
    assert layer.weight.grad is None
    torch.testing.assert_close(layer.bias.grad, torch.full((8,), 5.0))


def test_bfloat16_and_switching_back_use_torch_linear():
    layer = torch.nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    use_onednn_linear(layer)
    assert torch.equal(layer(x), expected)
    assert use_onednn_linear(layer, enabled=False) == 1 and type(layer) is torch.nn.Linear


def test_models_train_as_with_torch_linear(tiny_policy, tiny_reward_model):
    from rayrlhf.modeling import load_causal_lm, load_scalar_model

    ids = torch.randint(3, 50, (2, 12))
    for model in (load_causal_lm(tiny_policy, "float32"), load_scalar_model(tiny_reward_model, "float32")):
        assert use_onednn_linear(model) == len([m for m in model.modules() if isinstance(m, torch.nn.Linear)])
        results = []
        for enabled in (True, False):
            use_onednn_linear(model, enabled)
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids).logits
            (out.float() ** 2).mean().backward()
            results.append((out.detach(), [p.grad for p in model.parameters()]))
        (onednn_out, onednn_grads), (torch_out, torch_grads) = results
        torch.testing.assert_close(onednn_out, torch_out, rtol=1e-4, atol=1e-5)
        for g, e in zip(onednn_grads, torch_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", ["onednn", "torch", "auto"])
def test_model_linear_backend_picks_the_backend_of_the_scoring_models(tiny_policy, backend):
    """auto is oneDNN on AMD CPUs only (MKL, torch's BLAS, runs its AVX2 path there)."""
    from rayrlhf.algorithms import Sampling
    from rayrlhf.config import load_config
    from rayrlhf.scorers import ReferenceWorker

    cfg = load_config("conf/tiny_ppo.yaml", [f"model.linear_backend={backend}"])
    reference = ReferenceWorker(tiny_policy, cfg.model, micro_batch_size=4, sampling=Sampling())
    kinds = {type(m) for m in reference.model.modules() if isinstance(m, torch.nn.Linear)}
    amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    onednn = backend == "onednn" or (backend == "auto" and amd)
    assert kinds == ({OneDNNLinear} if onednn else {torch.nn.Linear})


def test_an_unusable_onednn_op_keeps_torch_linear_with_one_line(monkeypatch, capsys):
    """oneDNN's linear is a private torch op: where it fails (or disagrees), nothing is switched."""
    from rayrlhf import cpu_platform as onednn

    def broken(*args):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(onednn, "_linear", broken)
    onednn.available.cache_clear()
    try:
        layer = torch.nn.Linear(16, 8)
        assert not onednn.onednn_chosen("onednn") and use_onednn_linear(layer) == 0
        assert type(layer) is torch.nn.Linear
        assert capsys.readouterr().out.count("oneDNN's linear cannot be used here (RuntimeError: could not "
                                             "create a primitive)") == 1
    finally:
        onednn.available.cache_clear()


@pytest.mark.parametrize(("vendor", "expected"),
                         [("AuthenticAMD", True), ("GenuineIntel", False), ("", False)])
def test_auto_picks_onednn_on_amd_only_whatever_cpu_runs_the_test(monkeypatch, vendor, expected):
    from rayrlhf import cpu_platform as onednn

    monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
    assert onednn.onednn_chosen("auto") is expected
    assert onednn.onednn_chosen("onednn") and not onednn.onednn_chosen("torch")
