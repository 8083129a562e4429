"""The scoring path of the actor, the reference and the weight-sync check (modeling.policy_logprobs):
only the hidden states that score response tokens reach the LM head, a chunk of positions at a
time, recomputed in backward. It must give the numbers the full [B, T, V] logits give, on a
131k-token vocabulary, with every sampling transform and layout, gradients included."""

import pytest
import torch

from rayrlhf import modeling
from rayrlhf.algorithms import (
    Sampling,
    entropy_from_logits,
    response_mask,
    sampling_logits,
    seen_tokens,
    token_logprobs,
)
from rayrlhf.batch import build_batch, position_ids

SAMPLINGS = {"plain": Sampling(), "temperature": Sampling(temperature=0.7),
             "transformed": Sampling(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.3)}


def full_logits_reference(model, batch, sampling):
    """The path this replaced: logits at every position of every row, then the response's."""
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["sequences"], attention_mask=mask, position_ids=position_ids(mask),
                   use_cache=False).logits
    start, tokens = batch.prompt_len, batch["sequences"][:, batch.prompt_len:]
    seen = seen_tokens(batch["sequences"][:, :start], mask[:, :start].bool(), tokens, logits.shape[-1]) \
        if sampling.penalises else None
    scoring = sampling_logits(logits[:, start - 1:-1], tokens, sampling, seen)
    real = response_mask(tokens, batch["response_lengths"])
    return token_logprobs(scoring, tokens) * real, entropy_from_logits(scoring) * real


def groups_of_uneven_responses(vocab: int):
    generator = torch.Generator().manual_seed(0)

    def tokens(count):
        return torch.randint(3, vocab, (count,), generator=generator).tolist()

    prompts = [tokens(5)] * 2 + [tokens(3)] * 2
    responses = [tokens(n) for n in (6, 2, 4, 1)]
    responses[1] += responses[1][:1]  # a repeated token, for the repetition penalty
    return build_batch(prompts, responses, pad_id=0)


@pytest.fixture(scope="module")
def qwen2(realistic_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(realistic_models("qwen2"), attn_implementation="sdpa").float()


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
@pytest.mark.parametrize("packing", ["none", "samples", "prompts"])
def test_chunked_scoring_matches_the_full_logits_with_gradients(qwen2, monkeypatch, sampling, packing):
    vocab = qwen2.config.vocab_size
    assert vocab == 131072
    # 3 positions a chunk: the 14 response tokens take 5 chunks, each recomputed in backward.
    monkeypatch.setitem(modeling.LOGITS_CHUNK_BYTES, "cpu", 3 * 4 * vocab)
    batch = groups_of_uneven_responses(vocab)
    modeling._register_packed_attention()
    qwen2.config._attn_implementation = modeling.PACKED_ATTENTION
    weights = torch.linspace(-1, 1, batch["sequences"].shape[1] - batch.prompt_len)

    def scored(fn):
        qwen2.zero_grad()
        logprobs, entropy = fn()
        (logprobs * weights).sum().add(entropy.sum()).backward()
        return logprobs.detach(), entropy.detach(), {n: p.grad.clone() for n, p in qwen2.named_parameters()}

    new = scored(lambda: modeling.policy_logprobs_and_entropy(qwen2, batch, sampling, True, packing))
    old = scored(lambda: full_logits_reference(qwen2, batch, sampling))
    torch.testing.assert_close(new[0], old[0], rtol=0, atol=2e-6)
    # The entropy (about ln V = 11.8 here) sums 131k terms in fp32: within 2e-6 of it relatively.
    torch.testing.assert_close(new[1], old[1], rtol=2e-6, atol=2e-6)
    assert new[2].keys() == old[2].keys()
    # Each gradient sums over positions (and the head's over 131k entropy terms) in another order:
    # fp32 agrees to ~1e-5 of the gradient's own scale (measured 4-8e-6 on AMD EPYC, less on Xeon);
    # a wrong term is off by its whole size.
    for name, grad in old[2].items():
        error = new[2][name] - grad
        assert error.norm() <= 2e-5 * grad.norm(), (name, (error.norm() / grad.norm()).item())
        assert error.abs().max() <= 2e-5 * grad.abs().max(), (name, error.abs().max().item())


@pytest.mark.parametrize("sampling", ["plain", "transformed"])
def test_no_tensor_of_every_position_times_the_vocabulary_is_kept_for_backward(qwen2, monkeypatch, sampling):
    """What autograd saves for backward over a batch of 14 response tokens, in chunks of 3: nothing
    the size of 14 x V (the full logits would be 4 x 10 x V)."""
    vocab = qwen2.config.vocab_size
    monkeypatch.setitem(modeling.LOGITS_CHUNK_BYTES, "cpu", 3 * 4 * vocab)
    batch = groups_of_uneven_responses(vocab)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logprobs, _ = modeling.policy_logprobs_and_entropy(qwen2, batch, SAMPLINGS[sampling], True)
    assert logprobs.requires_grad and saved
    # The embedding and the tied head's weight are V x hidden; the rest is per token.
    largest_activation = max(n for n in saved if n != qwen2.get_output_embeddings().weight.numel())
    assert largest_activation < 14 * vocab // 4, largest_activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_head_matches_the_autograd_path_in_each_dtype(dtype):
    """The fused path (the head's weight) against the general one (the head as a function, autograd
    ops chunk by chunk), both with entropy and every gradient: in bf16, as on a GPU, the logits are
    the bf16 product taken to fp32 by both, and the backward products run in bf16."""
    from rayrlhf.algorithms import chunked_logprobs

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 64, generator=generator).to(dtype).requires_grad_(True)
    weight = (torch.randn(5000, 64, generator=generator) * 0.2).to(dtype).requires_grad_(True)
    tokens = torch.randint(5000, (23,), generator=generator)
    sampling = Sampling(temperature=0.8)
    weights = torch.linspace(-1, 1, 23)

    def scored(head):
        hidden.grad = weight.grad = None
        logprobs, entropy = chunked_logprobs(hidden, head, tokens, sampling, chunk=5, with_entropy=True)
        (logprobs * weights).sum().add(entropy.sum()).backward()
        return logprobs.detach(), entropy.detach(), hidden.grad.float(), weight.grad.float()

    fused = scored(weight)
    general = scored(lambda h: torch.nn.functional.linear(h, weight))
    exact = dtype == torch.float32
    for name, a, b in zip(("logprobs", "entropy", "hidden grad", "weight grad"), fused, general, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5 if exact else 2e-2, atol=1e-5 if exact else 2e-2,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_the_head_takes_the_fused_path_on_either_linear_backend(qwen2):
    """model.linear_backend picks oneDNN on AMD CPUs and torch's BLAS elsewhere: the LM head must
    reach the fused path either way (forced here, whatever this machine's CPU)."""
    from rayrlhf.cpu_platform import available, use_onednn_linear

    assert modeling._lm_head(qwen2) is qwen2.get_output_embeddings().weight
    assert available() and use_onednn_linear(qwen2) > 0
    try:
        assert modeling._lm_head(qwen2) is qwen2.get_output_embeddings().weight
    finally:
        use_onednn_linear(qwen2, enabled=False)
