"""Parameter-efficient fine-tuning through peft, and the plain-HF view of a wrapped model.

The rollout engines, the saved checkpoints and the next pipeline stage all want the weights a
plain transformers model has. With the mergeable methods (validation.MERGEABLE_PEFT) those are the
base weights with the learnt update merged in, computed out of place so the trained adapters are
never disturbed; a 4-bit base (qlora) is dequantized to the model's dtype first. The soft prompts
(validation.SOFT_PROMPT_PEFT) leave the base weights as they are and learn virtual tokens, which our
forward (`last_hidden_state`) puts before the inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# A saved model's subfolder with a soft prompt (peft's adapter format), beside the plain weights.
SOFT_PROMPT_DIR = "soft_prompt"


def quantization(peft_cfg, dtype: torch.dtype):
    """transformers' loading option for the 4-bit base of qlora (None for the other methods)."""
    if peft_cfg.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=peft_cfg.quant_type,
                              bnb_4bit_use_double_quant=peft_cfg.double_quant, bnb_4bit_compute_dtype=dtype)


def apply_peft(model, peft_cfg, scalar_head: bool, total_steps: int):
    """Wraps `model` so only the method's parameters (and a scalar head, which is new) train.
    `total_steps` (the role's optimizer steps) is AdaLoRA's budget schedule's length."""
    import peft

    task = peft.TaskType.SEQ_CLS if scalar_head else peft.TaskType.CAUSAL_LM
    c, method = peft_cfg, peft_cfg.method
    lora = dict(lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=list(c.target_modules))
    if method in ("lora", "qlora"):
        config = peft.LoraConfig(r=c.rank, **lora, task_type=task)
    elif method == "adalora":
        if c.warmup_steps + c.final_steps >= total_steps:
            raise ValueError(f"peft.warmup_steps + peft.final_steps ({c.warmup_steps} + {c.final_steps}) "
                             f"leave AdaLoRA no steps to prune ranks in, of {total_steps} optimizer steps")
        config = peft.AdaLoraConfig(init_r=c.init_rank, target_r=c.rank, tinit=c.warmup_steps,
                                    tfinal=c.final_steps, deltaT=c.reallocate_every,
                                    orth_reg_weight=c.orth_reg_weight, total_step=total_steps, **lora,
                                    task_type=task)
    elif method == "ia3":
        config = peft.IA3Config(target_modules=list(c.target_modules),
                                feedforward_modules=list(c.feedforward_modules), task_type=task)
    elif method == "prompt":  # started from embeddings of tokens of the vocabulary, as peft offers
        config = peft.PromptTuningConfig(num_virtual_tokens=c.virtual_tokens, task_type=task,
                                         prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
    elif method == "ptuning":
        config = peft.PromptEncoderConfig(num_virtual_tokens=c.virtual_tokens,
                                          encoder_hidden_size=c.encoder_hidden_size,
                                          encoder_reparameterization_type=c.encoder_type, task_type=task)
    else:  # prefix, ptuning_v2: keys and values per key-value head (peft's default, per query head,
        # does not fit grouped-query attention)
        text = model.config.get_text_config()
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        config = peft.PrefixTuningConfig(num_virtual_tokens=c.virtual_tokens,
                                         prefix_projection=method == "prefix",
                                         encoder_hidden_size=c.encoder_hidden_size,
                                         token_dim=kv_heads * head_dim, num_attention_heads=kv_heads,
                                         num_layers=text.num_hidden_layers, task_type=task)
    return peft.get_peft_model(model, config)


def plain_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model itself (under a peft wrapper, the one it wraps)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def save_plain(module: torch.nn.Module, path: str, state: dict[str, torch.Tensor]) -> None:
    """The plain model with the weights `state` (hf_weights'), in transformers' format. A 4-bit
    base's quantizer would save its own packed weights instead, and its config would make loaders
    quantize again: the saved model is a plain one in the model's dtype."""
    model = plain_model(module)
    quantizer, quantization = model.__dict__.pop("hf_quantizer", None), model.config.__dict__.pop(
        "quantization_config", None)
    try:
        model.save_pretrained(path, state_dict=state, safe_serialization=True)
    finally:
        if quantizer is not None:
            model.hf_quantizer, model.config.quantization_config = quantizer, quantization


def _soft_prompt(module: torch.nn.Module):
    """The module's peft config if it learns a soft prompt, else None."""
    config = getattr(module, "active_peft_config", None)
    return config if config is not None and config.is_prompt_learning else None


def last_hidden_state(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's last hidden states [B, T, H] for `inputs` (input_ids, attention_mask [B, T] or
    [B, 1, T, T], position_ids). A soft prompt's n virtual tokens come first, at positions 0..n-1,
    visible to every token, and the inputs follow at their positions + n (where peft puts them):
    as embeddings before the inputs' (prompt, ptuning) or as every layer's first keys and values
    (prefix, ptuning_v2)."""
    backbone = plain_model(module).base_model
    config = _soft_prompt(module)
    if config is None:
        return backbone(**inputs, use_cache=False).last_hidden_state
    if set(inputs) != {"input_ids", "attention_mask", "position_ids"}:
        raise ValueError("a soft prompt does not run on packed token streams")
    ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    n, rows = config.num_virtual_tokens, len(ids)
    prompts = module.get_prompt(batch_size=rows)
    if not torch.is_tensor(prompts):  # a cache holding every layer's virtual keys and values
        return backbone(input_ids=ids, attention_mask=_with_virtual(mask, n, as_keys_only=True),
                        position_ids=positions + n, past_key_values=prompts,
                        use_cache=False).last_hidden_state
    embeddings = backbone.get_input_embeddings()(ids)
    virtual_positions = torch.arange(n, device=ids.device).expand(rows, n)
    hidden = backbone(inputs_embeds=torch.cat([prompts.to(embeddings.dtype), embeddings], 1),
                      attention_mask=_with_virtual(mask, n, as_keys_only=False),
                      position_ids=torch.cat([virtual_positions, positions + n], 1),
                      use_cache=False).last_hidden_state
    return hidden[:, n:]


def _with_virtual(mask: torch.Tensor, n: int, as_keys_only: bool) -> torch.Tensor:
    """`mask` with n virtual tokens first that every token sees: as keys only (a prefix in the
    cache), or also as queries that see the virtual tokens before them."""
    if mask.dim() == 2:
        return torch.cat([mask.new_ones(len(mask), n), mask], 1)
    rows, _, width, _ = mask.shape
    seen = mask.new_ones(rows, 1, width, n)
    if as_keys_only:
        return torch.cat([seen, mask], -1)
    virtual = torch.ones(n, n, dtype=mask.dtype, device=mask.device).tril().expand(rows, 1, n, n)
    virtual_rows = torch.cat([virtual, mask.new_zeros(rows, 1, n, width)], -1)
    return torch.cat([virtual_rows, torch.cat([seen, mask], -1)], 2)


def orthogonality_penalty(module: torch.nn.Module) -> torch.Tensor | float:
    """AdaLoRA's regulariser (weighted by orth_reg_weight, as peft's own forward adds it to a loss it
    computes; ours bypasses that forward): the mean Frobenius distance of P^T P and Q Q^T from the
    identity over its singular-vector matrices. 0 for the other methods."""
    config = getattr(module, "active_peft_config", None)
    if config is None or config.peft_type != "ADALORA" or not config.orth_reg_weight:
        return 0.0
    distances = []
    for name, param in module.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            product = param @ param.T if ".lora_A." in name else param.T @ param
            identity = torch.eye(len(product), device=product.device)
            distances.append(torch.linalg.matrix_norm(product - identity))
    return config.orth_reg_weight * torch.stack(distances).mean()


def reallocate_ranks(module: torch.nn.Module, optimizer_step: int) -> None:
    """AdaLoRA's rank budget at `optimizer_step` (0-based), from the gradients still held: peft's
    update_and_allocate, which must run after the optimizer step and before the gradients are
    zeroed."""
    config = getattr(module, "active_peft_config", None)
    if config is not None and config.peft_type == "ADALORA":
        module.base_model.update_and_allocate(optimizer_step)


def adalora_state(module: torch.nn.Module) -> dict:
    """What a checkpoint must keep of AdaLoRA besides the weights: the rank pattern chosen and the
    allocator's importance averages ({} for the other methods)."""
    config = getattr(module, "active_peft_config", None)
    if config is None or config.peft_type != "ADALORA":
        return {}
    allocator = module.base_model.rankallocator
    return {"rank_pattern": config.rank_pattern, "ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt,
            "exp_avg_unc": allocator.exp_avg_unc}


def load_adalora_state(module: torch.nn.Module, state: dict) -> None:
    if not state:
        return
    module.active_peft_config.rank_pattern = state["rank_pattern"]
    allocator = module.base_model.rankallocator
    allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (state[k] for k in ("ipt", "exp_avg_ipt",
                                                                                       "exp_avg_unc"))


# One weight of the plain model: its name there, the trainer parameters it is computed from (all
# must be gathered under ZeRO-3; the first has its shape and dtype, see dense_spec), and the
# function that computes it from them.
HFWeight = tuple[str, list[torch.nn.Parameter], Callable[[], torch.Tensor]]


def hf_weights(module: torch.nn.Module) -> list[HFWeight]:
    """The plain model's weights, in named_parameters order, the mergeable methods' updates merged
    in (the adapters' own parameters and a soft prompt are not among them)."""
    model = plain_model(module)
    if model is module:  # (not importing peft, which takes seconds, in every trainer)
        return [(name, [param], lambda p=param: _dense(p)) for name, param in model.named_parameters()]
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = {name: layer for name, layer in model.named_modules() if isinstance(layer, BaseTunerLayer)}
    weights = []
    for name, param in model.named_parameters():
        if ".original_module." in name:  # the untrained copy of a head that peft trains (modules_to_save)
            continue
        hf_name = name.replace(".modules_to_save.default.", ".")
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") and owner.removesuffix(".base_layer") in adapted:
            layer = adapted[owner.removesuffix(".base_layer")]
            parts = [param, *(p for p in layer.parameters() if p is not param)]  # its own first
            weights.append((hf_name.replace(".base_layer.", "."), parts,
                            lambda layer=layer, leaf=leaf: _merged(layer)[leaf]))
        elif not any(owner == a or owner.startswith(a + ".") for a in adapted):
            weights.append((hf_name, [param], lambda p=param: _dense(p)))
    return weights


def dense_spec(param: torch.nn.Parameter) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype of a parameter in full, without gathering or dequantizing it: a ZeRO-3
    partition keeps them in ds_shape, a 4-bit parameter in its quantization state."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        return tuple(state.shape), state.dtype
    return tuple(getattr(param, "ds_shape", param.shape)), param.dtype


def _dense(param: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's values in the model's dtype (a 4-bit one dequantized)."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return param.data
    import bitsandbytes

    return bitsandbytes.functional.dequantize_4bit(param.data, state)


def _merged(layer) -> dict[str, torch.Tensor]:
    """The adapted layer's base weight (and bias) with its active adapter merged, out of place."""
    base, adapter = layer.get_base_layer(), layer.active_adapters[0]
    if hasattr(layer, "get_delta_weight"):  # lora, qlora, adalora: W + the low-rank update
        weight = _dense(base.weight)
        merged = {"weight": weight + layer.get_delta_weight(adapter).to(weight.dtype)}
        return merged if base.bias is None else {**merged, "bias": base.bias.data}
    # ia3 (which also scales the bias): peft's own merge, into copies of the base tensors
    params = dict(base.named_parameters(recurse=False))
    kept = {key: p.data for key, p in params.items()}
    try:
        for p in params.values():
            p.data = p.data.clone()
        layer.merge(adapter_names=[adapter])
        return {key: p.data for key, p in params.items()}
    finally:
        for key, p in params.items():
            p.data = kept[key]
        layer.merged_adapters.clear()
