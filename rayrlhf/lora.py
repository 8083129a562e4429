"""LoRA through peft, and the plain-HF view of a (possibly LoRA-wrapped) model's weights.

The rollout engines, the saved checkpoints and the next pipeline stage all want the weights a
plain transformers model has. With LoRA those are the base weights with the low-rank update
merged in (W + s B A), computed out of place so the trained adapters are never disturbed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PEFT_PREFIX = "base_model.model."


def apply_lora(model, lora_cfg, scalar_head: bool):
    """Wraps `model` so only the LoRA matrices (and a scalar head, which is new) train."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.target_modules),
                        task_type=TaskType.SEQ_CLS if scalar_head else TaskType.CAUSAL_LM)
    return get_peft_model(model, config)


def plain_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model itself (under a peft wrapper, the one it wraps)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


# One weight of the plain model: its name there, the trainer parameters it is computed from (all
# must be gathered under ZeRO-3), and the function that computes it from them.
HFWeight = tuple[str, list[torch.nn.Parameter], Callable[[], torch.Tensor]]


def hf_weights(module: torch.nn.Module) -> list[HFWeight]:
    """The plain model's weights, in named_parameters order, LoRA updates merged in."""
    if not hasattr(module, "get_base_model"):
        return [(name, [p], (lambda p=p: p.data)) for name, p in module.named_parameters()]
    modules = dict(module.named_modules())
    weights = []
    for name, param in module.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        hf_name = name.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default.", ".")
        if name.endswith(".base_layer.weight"):
            layer = modules[name.removesuffix(".base_layer.weight")]
            adapter = layer.active_adapters[0]
            parts = [param, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
            merged = lambda p=param, lyr=layer, a=adapter: p.data + lyr.get_delta_weight(a).to(p.dtype)  # noqa: E731
            weights.append((hf_name.replace(".base_layer.", "."), parts, merged))
        else:
            weights.append((hf_name.replace(".base_layer.", "."), [param], (lambda p=param: p.data)))
    return weights
