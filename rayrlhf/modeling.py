"""Loading HF models and reading log-probs, values and scores from them in the shared layout."""

from __future__ import annotations

import torch

from rayrlhf.adapters import SOFT_PROMPT_DIR, last_hidden_state, plain_model
from rayrlhf.algorithms import PenaltyMask, Sampling, chunked_logprobs, response_mask
from rayrlhf.batch import Batch, pack_rows, pair_rows, position_ids
from rayrlhf.cpu_platform import OneDNNLinear
from rayrlhf.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Our models' attention: SDPA, with a padding-free path for packed rows (see _packed_attention).
PACKED_ATTENTION = "rayrlhf_packed_sdpa"


def load_causal_lm(path: str, dtype: str, quantization=None):
    """`quantization`: transformers' option for a quantized base (adapters.quantization)."""
    from transformers import AutoModelForCausalLM

    _register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                 attn_implementation=PACKED_ATTENTION,
                                                 **_quantized(quantization))
    return model if quantization is None else _settle_4bit(model)


def load_scalar_model(path: str, dtype: str, quantization=None):
    """A sequence-classification model with one output: the reward model, and the critic.

    Started from a causal LM checkpoint, the backbone is reused and the scalar head is new.
    """
    from transformers import AutoModelForSequenceClassification

    _register_packed_attention()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=DTYPES[dtype], attn_implementation=PACKED_ATTENTION,
        **_quantized(quantization))
    return model if quantization is None else _settle_4bit(model)


def _quantized(quantization) -> dict:
    # bitsandbytes quantizes the weights as they reach their device: straight onto this rank's.
    return {} if quantization is None else {"quantization_config": quantization,
                                            "device_map": {"": default_device()}}


def _settle_4bit(model):
    """A model just loaded with a 4-bit base (bitsandbytes), made to hold only that in memory and to
    compute the same in eval mode as in training.

    Memory: the unquantized tensors (embeddings, norms, head) are views of the checkpoint file's
    memory map, which quantization read whole, so the process kept the full-precision file
    resident (1.4 GB of a 340M-parameter model beside its 4-bit copy); they get their own memory,
    and the allocator returns what quantization freed. Products: bitsandbytes' 4-bit layers, on
    CPUs with AVX512-BF16, switch in eval mode without gradients to a repacked bf16 kernel, so the
    old, reference and check log-probs would differ from the training forward's by the CPU model;
    they are kept on one path (dequantize, then the product in the compute dtype) on every CPU."""
    import ctypes
    import gc

    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if getattr(tensor, "quant_state", None) is None:
                tensor.data = tensor.data.clone()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory stays with the allocator
        pass
    return model


def _register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # masks for unpacked calls, as SDPA's


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      packed_slots=None, packed_tokens=None, packed_real=None, **kwargs):
    """SDPA over packed rows whose tokens reach the model as one padding-free stream: [1, T]
    positions go through every other layer, and only attention lays them out in the rows' [R, W]
    grid (under the rows' [R, 1, W, W] segment mask) and reads them back. `packed_slots` [T] is
    each token's slot in the flattened grid, `packed_tokens` [R * W] the token at each slot (any
    on the padding, which the mask hides), `packed_real` [R * W, 1, 1] true off the padding.
    Calls without them are plain SDPA."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if packed_slots is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows, width = attention_mask.shape[0], attention_mask.shape[-1]

    def grid(states: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [R, H, W, D]
        placed = _MoveRows.apply(states[0].transpose(0, 1), packed_tokens, packed_slots, None)
        return placed.view(rows, width, *placed.shape[1:]).transpose(1, 2)

    groups = getattr(module, "num_key_value_groups", 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        grid(query), repeat_kv(grid(key), groups), repeat_kv(grid(value), groups),
        attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    # Back to the stream, as the [B, T, H, D] the model's attention layer expects.
    stream = _MoveRows.apply(out.transpose(1, 2).flatten(0, 1), packed_slots, packed_tokens, packed_real)
    return stream.unsqueeze(0), None


class _MoveRows(torch.autograd.Function):
    """x.index_select(0, index) where each row of x goes to one place at most (a place may copy
    a row as a constant: the grid's padding). The gradient then moves back by a gather as well,
    `back_index` [len(x)], zero where `kept` [len(x), 1, 1] (if given) is false, rather than by
    autograd's scatter-add, which runs serially on CPU and cost more than the padding it saves."""

    @staticmethod
    def forward(ctx, x, index, back_index, kept):
        ctx.save_for_backward(back_index, kept)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        back_index, kept = ctx.saved_tensors
        grad = grad.index_select(0, back_index)
        return (grad if kept is None else grad * kept), None, None, None


def check_model_path(key: str, path: str, tokenizer: bool = False) -> None:
    """A clear error, in the driver before any actor starts, for a model that cannot load."""
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1
    if looks_local and not Path(path).expanduser().exists():
        raise ModelError(f"{key} '{path}' does not exist")
    if (Path(path).expanduser() / SOFT_PROMPT_DIR).exists():
        raise ModelError(f"{key} '{path}' was trained with a soft prompt ({SOFT_PROMPT_DIR}/), which only "
                         "peft applies: the roles here load plain weights (train it with a mergeable "
                         "peft.method)")
    try:
        (AutoTokenizer if tokenizer else AutoConfig).from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any loader failure means an unusable path
        raise ModelError(f"{key} '{path}' cannot be loaded: {str(err).splitlines()[0]}") from None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    mask = batch["attention_mask"]
    return {"input_ids": batch["sequences"], "attention_mask": mask, "position_ids": position_ids(mask)}


def _scoring_inputs(batch: Batch, packing: str):
    """Model inputs for the batch and the function that takes the model's per-position outputs
    to [B, N, ...]: those at the positions that score each response token. `packing` (see
    batch.pack_rows): "none" keeps the padded layout, "samples" packs samples into rows, "prompts"
    also computes each prompt once for all its responses."""
    if packing == "none":
        start = batch.prompt_len - 1
        return _model_inputs(batch), lambda out: out[:, start:-1]
    rows = pack_rows(batch, share_prompts=packing == "prompts")
    # The linear layers see only the real tokens (see _packed_attention): the rows' end padding
    # is 10-20% of the grid for GRPO groups of uneven responses.
    real = rows.segment_ids.flatten() > 0
    slots = real.nonzero().squeeze(1)
    tokens = torch.zeros(real.numel(), dtype=torch.long, device=real.device)
    tokens[slots] = torch.arange(len(slots), device=real.device)
    inputs = {"input_ids": rows.input_ids.flatten()[slots][None],
              "position_ids": rows.position_ids.flatten()[slots][None],
              "attention_mask": segment_mask(rows.segment_ids, rows.sample_ids),
              "packed_slots": slots, "packed_tokens": tokens, "packed_real": real[:, None, None]}
    width = rows.input_ids.shape[1]
    return inputs, lambda out: out[0, tokens[rows.rows * width + rows.cols]]


def segment_mask(segments: torch.Tensor, samples: torch.Tensor | None = None) -> torch.Tensor:
    """[R, 1, W, W] attention mask of rows of packed segments: causal, within a segment only,
    and (given `samples`, see batch.PackedRows) a response sees its prompt and itself only."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal & (segments[:, None, :] > 0)
    if samples is not None:
        allowed &= (samples[:, None, :] == 0) | (samples[:, :, None] == samples[:, None, :])
    return allowed[:, None]


# The most logits (fp32 bytes) that exist at once when scoring tokens; see chunked_logprobs. At
# 131k-152k vocabularies 32 MB is 55-64 positions: on the CPUs measured the chunk's in-place steps
# then run in cache, and the log-prob fwd+bwd of 4 x 1,000 response tokens took 2.2 s against 2.7 s
# at 128 MB (and 5.6 s unfused). A GPU wants bigger products: 512 MB is 900-1,000 positions.
LOGITS_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}


def policy_logprobs(model, batch: Batch, sampling: Sampling, packing: str = "none") -> torch.Tensor:
    """[B, N] log-probs of the response tokens under `model`, in the engines' sampling distribution."""
    return policy_logprobs_and_entropy(model, batch, sampling, with_entropy=False, packing=packing)[0]


def policy_logprobs_and_entropy(model, batch: Batch, sampling: Sampling, with_entropy: bool,
                                packing: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and, if asked, the entropy of the policy at each response position ([B, N], 0 on
    the padding). Only the hidden states that score a response token reach the LM head (see
    algorithms.chunked_logprobs)."""
    inputs, pick = _scoring_inputs(batch, packing)
    responses = batch["sequences"][:, batch.prompt_len:]
    real = response_mask(responses, batch["response_lengths"]).bool()
    hidden = pick(last_hidden_state(model, inputs))[real]
    model = plain_model(model)
    seen = None
    if sampling.penalises:
        prompts, prompt_mask = (batch[key][:, :batch.prompt_len] for key in ("sequences", "attention_mask"))
        row, col = real.nonzero(as_tuple=True)
        mask = PenaltyMask(prompts, prompt_mask.bool(), responses, model.config.vocab_size)
        seen = lambda index: mask(row[index], col[index])  # noqa: E731
    logprobs, entropy = chunked_logprobs(hidden, _lm_head(model), responses[real], sampling,
                                         _chunk_positions(model, hidden.device), seen, with_entropy)
    return _scatter(logprobs, real), None if entropy is None else _scatter(entropy, real)


def sft_token_logprobs(model, batch: Batch) -> torch.Tensor:
    """[M] log-probs of the M tokens under `loss_mask` of rows laid out by data.sft_batch, each from
    the position before it; packed examples attend only within themselves."""
    segments = batch["segment_ids"]
    mask = segment_mask(segments) if segments.max() > 1 else (segments > 0).long()
    hidden = last_hidden_state(model, {"input_ids": batch["sequences"], "attention_mask": mask,
                                       "position_ids": batch["position_ids"]})
    scored = batch["loss_mask"][:, 1:].bool()
    model = plain_model(model)
    return chunked_logprobs(hidden[:, :-1][scored], _lm_head(model), batch["sequences"][:, 1:][scored],
                            Sampling(), _chunk_positions(model, hidden.device))[0]


def _lm_head(model):
    """The causal LM's hidden-state -> logits map, with the final soft cap of models that have one;
    its weight alone where it is a plain linear map (the fused path of chunked_logprobs, whose
    products are torch's, so on either CPU backend of model.linear_backend) and not partitioned by
    ZeRO-3 (whose module hooks gather it for each call)."""
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    if cap:
        return lambda hidden: torch.tanh(head(hidden) / cap) * cap
    plain = type(head) in (torch.nn.Linear, OneDNNLinear) and head.bias is None
    if plain and not hasattr(head.weight, "ds_id"):
        return head.weight
    return head


def _chunk_positions(model, device: torch.device) -> int:
    budget = LOGITS_CHUNK_BYTES.get(device.type, LOGITS_CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * model.config.vocab_size))


def _scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """values [M] at the M true places of `where` [B, N], 0 elsewhere."""
    return torch.zeros(where.shape, dtype=values.dtype, device=values.device).masked_scatter(where, values)


def _scalar_head(model, batch: Batch) -> torch.Tensor:
    """[B, T] the scalar head applied at every position (HF reads it at one position only)."""
    hidden = last_hidden_state(model, _model_inputs(batch))
    return plain_model(model).score(hidden).squeeze(-1).float()


def pair_scores(model, batch: Batch) -> torch.Tensor:
    """[B, 2] reward-model scores of preference pairs laid out by data.preference_batch."""
    return sequence_scores(model, pair_rows(batch)).view(len(batch), 2)


def token_values(model, batch: Batch, packing: str = "none") -> torch.Tensor:
    """[B, N] V(x, y_<i): read where the logits that score response token i are read."""
    inputs, pick = _scoring_inputs(batch, packing)
    hidden = pick(last_hidden_state(model, inputs))
    return plain_model(model).score(hidden).squeeze(-1).float()


def sequence_scores(model, batch: Batch) -> torch.Tensor:
    """[B] the head at the last real token of each sequence (the response's last token)."""
    last = batch.prompt_len + batch["response_lengths"].clamp(min=1) - 1
    return _scalar_head(model, batch)[torch.arange(len(batch)), last]


def default_device() -> torch.device:
    """The GPU Ray assigned to this actor, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(batch.prompt_len, {k: v.to(device) for k, v in batch.tensors.items()})


@torch.no_grad()
def infer_in_micro_batches(fn, model, batch: Batch, micro_batch_size: int, device: torch.device,
                           **kwargs) -> torch.Tensor:
    """fn(model, micro_batch, **kwargs) over the batch, results concatenated on the CPU."""
    outputs = [fn(model, to_device(mb, device), **kwargs).float().cpu()
               for mb in batch.minibatches(micro_batch_size)]
    return torch.cat(outputs)
