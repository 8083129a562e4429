"""The PPO math for language models, as plain functions of tensors.

Shapes: B sequences, N response tokens. `mask` is 1.0 on valid response tokens (up to and
including EOS) and 0.0 on padding. Nothing here knows about Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint


@dataclass(frozen=True)
class Sampling:
    """How the rollout engines turn a position's logits into the distribution they sample from
    (vLLM's order): the repetition penalty on every token already in the prompt or the response
    (positive logits divided by it, the others multiplied), then temperature, then top-k and top-p
    (the tokens left out get probability 0). That distribution is the policy: the engines report
    their log-probs under it, and the trainer and the reference compute theirs under it too."""
    temperature: float = 1.0
    top_k: int = -1  # -1: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @classmethod
    def of(cls, rollout_cfg) -> Sampling:
        return cls(rollout_cfg.temperature, rollout_cfg.top_k, rollout_cfg.top_p,
                   rollout_cfg.repetition_penalty)

    @property
    def penalises(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


def response_logprobs(logits: torch.Tensor, sequences: torch.Tensor, prompt_len: int,
                      sampling: Sampling = Sampling()) -> torch.Tensor:
    """Log-probs of the response tokens of `sequences` under `logits`.

    `sequences` is [B, P + N] with every prompt left-padded to P, so response token j sits at
    column P + j and is scored by the logits at column P + j - 1. The sampling transforms apply
    first (temperature divides the logits), as the sampler's did when it drew the tokens; every
    prompt column counts as a real token for the repetition penalty.
    """
    tokens, prompts = sequences[:, prompt_len:], sequences[:, :prompt_len]
    seen = seen_tokens(prompts, torch.ones_like(prompts, dtype=torch.bool), tokens, logits.shape[-1]) \
        if sampling.penalises else None
    return token_logprobs(sampling_logits(logits[:, prompt_len - 1:-1], tokens, sampling, seen), tokens)


def token_logprobs(scoring: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, N] log-probs of `tokens` under the logits [B, N, V] that score them."""
    return _TokenLogprobs.apply(scoring, tokens)


class _TokenLogprobs(torch.autograd.Function):
    """z[token] - logsumexp(z), whose backward writes g (onehot(token) - softmax(z)) into one new
    tensor of z's size; autograd's gather and logsumexp backwards make several, and on a 131k
    vocabulary those passes over memory cost as much as the LM head's product."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        log_z = z.logsumexp(dim=-1, keepdim=True)
        ctx.save_for_backward(z, tokens, log_z)
        return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_z.squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, tokens, log_z = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_z = torch.sub(z, log_z).exp_().mul_(-grad)
        return grad_z.scatter_add_(-1, tokens.unsqueeze(-1), grad), None


def seen_tokens(prompts: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
                vocab: int) -> torch.Tensor:
    """[B, N, V] bool: token v occurs in prompt b (where `prompt_mask`) or in its response before
    position j, the tokens the repetition penalty applies to when response token j is drawn."""
    rows, length = responses.shape
    row = torch.arange(rows, device=responses.device).repeat_interleave(length)
    col = torch.arange(length, device=responses.device).repeat(rows)
    return PenaltyMask(prompts, prompt_mask, responses, vocab)(row, col).view(rows, length, vocab)


class PenaltyMask:
    """seen_tokens at chosen response positions only: [len(row), V] for positions (row, col),
    so that a chunk of positions needs no [B, N, V] tensor."""

    def __init__(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor, vocab: int):
        self.responses = responses
        self.in_prompt = torch.zeros(prompts.shape[0], vocab, dtype=torch.uint8, device=prompts.device) \
            .scatter_reduce(1, prompts, prompt_mask.to(torch.uint8), "amax")

    def __call__(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        earlier = self.responses[row]
        before = torch.arange(earlier.shape[1], device=row.device)[None] < col[:, None]
        return self.in_prompt[row].scatter_reduce(1, earlier, before.to(torch.uint8), "amax").bool()


def sampling_logits(scoring: torch.Tensor, tokens: torch.Tensor, sampling: Sampling,
                    seen: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 logits [B, N, V] of the distribution `sampling` draws `tokens` from (see Sampling);
    `seen` (see seen_tokens) is needed for a repetition penalty. Tokens left out by top-k or top-p
    are at -inf, except the drawn token itself, which the engine kept: a boundary that rounding
    decided the other way here must not give it probability 0. The kept set carries no gradient."""
    z = scoring.float()
    if sampling.penalises:
        penalised = torch.where(z > 0, z / sampling.repetition_penalty, z * sampling.repetition_penalty)
        z = torch.where(seen, penalised, z)
    if sampling.temperature != 1.0:
        z = z / sampling.temperature
    if not sampling.truncates:
        return z
    with torch.no_grad():
        keep = torch.ones_like(z, dtype=torch.bool)
        if 0 < sampling.top_k < z.shape[-1]:
            keep = z >= z.topk(sampling.top_k, dim=-1).values[..., -1:]
        if sampling.top_p < 1.0:
            ascending, order = z.masked_fill(~keep, float("-inf")).sort(dim=-1)
            dropped = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
            dropped[..., -1] = False  # the most likely token always stays
            keep &= ~torch.zeros_like(dropped).scatter(-1, order, dropped)
        keep.scatter_(-1, tokens.unsqueeze(-1), True)
    return z.masked_fill(~keep, float("-inf"))


def response_mask(responses: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """1.0 for the first `lengths[b]` tokens of each right-padded response, 0.0 after.

    `lengths` counts the EOS token when the response finished, so nothing after EOS is kept.
    """
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions.unsqueeze(0) < lengths.unsqueeze(1)).float()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the valid tokens; padding stays 0."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman's k1/k2/k3).

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r, with log r = log pi - log pi_ref.
    k1 is unbiased but can be negative; k3 is unbiased and never negative; k2 is biased, low-variance.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str,
              norm_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    token_mean: every valid token weighs the same (long responses weigh more).
    seq_mean_token_mean: mean per sequence, then over sequences (every response weighs the same).
    seq_mean_token_sum_norm: token sum divided by (sequences x norm_len), a constant length, so
    the loss is not biased toward short or long responses (Dr. GRPO).
    """
    if mode == "token_mean":
        return masked_mean(values, mask)
    rows = (mask.sum(dim=1) > 0).float()
    if mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return (per_seq * rows).sum() / rows.sum().clamp(min=1.0)
    if mode == "seq_mean_token_sum_norm":
        if norm_len is None:
            raise ValueError("seq_mean_token_sum_norm needs norm_len")
        return (values * mask).sum() / (rows.sum().clamp(min=1.0) * norm_len)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """r_i = -beta * kl_i on every valid token, plus the sequence score on the last one (a
    multi-turn mask has gaps where observations are: the last valid token is the model's last)."""
    rewards = -kl_coef * kl * mask
    last = last_valid(mask)
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


def last_valid(mask: torch.Tensor) -> torch.Tensor:
    """[B] the column of each row's last valid token (0 for a row without one)."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask > 0, columns, 0).amax(dim=1)


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over response tokens.

    delta_i = r_i + gamma * V_{i+1} - V_i with V after the last valid token taken as 0;
    A_i = delta_i + gamma * lam * A_{i+1}; return_i = A_i + V_i. Returns (advantages, returns).
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for i in reversed(range(rewards.shape[1])):
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        advantage = delta + gamma * lam * next_advantage
        # Padding positions pass the future through untouched and hold no advantage.
        valid = mask[:, i]
        advantages[:, i] = advantage * valid
        next_value = values[:, i] * valid + next_value * (1 - valid)
        next_advantage = advantage * valid + next_advantage * (1 - valid)
    return advantages, advantages + values


POLICY_LOSSES = ("ppo", "cispo")
RATIO_LEVELS = ("token", "sequence")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float, clip_high: float | None = None,
                dual_clip: float | None = None, agg: str = "token_mean", norm_len: int | None = None,
                is_weights: torch.Tensor | None = None, kind: str = "ppo",
                ratio_level: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy-gradient loss of the importance ratio r = pi / pi_old, clipped to
    [1 - clip_low, 1 + clip_high] (clip_high > clip_low is DAPO's "clip-higher"):

      ppo:   per token max(-r A, -clip(r) A), PPO's clipped surrogate; dual_clip = c > 1 also caps
             the loss of negative-advantage tokens at -c A, so a huge ratio cannot blow it up.
      cispo: per token -sg(clip(r)) A log pi (CISPO): the clipped ratio only weighs the token's
             REINFORCE gradient, so no token loses its gradient to clipping.

    ratio_level "sequence" is GSPO's ratio: s = exp(mean over the response of log r), the same
    for every token of a response (so clipping keeps or drops whole responses), in its token form
    sg(s) pi / sg(pi), whose gradient is s grad log pi per token. is_weights multiply each token's
    loss (truncated importance sampling against the engine's sampling policy).
    """
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=1).detach()[:, None] + logprobs - logprobs.detach()
    elif ratio_level != "token":
        raise ValueError(f"unknown ratio level {ratio_level!r}")
    ratio = torch.exp(log_ratio)
    bounded = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    if kind == "ppo":
        unclipped, clipped = -advantages * ratio, -advantages * bounded
        per_token = torch.max(unclipped, clipped)
        if dual_clip is not None:
            per_token = torch.where(advantages < 0, torch.min(per_token, -advantages * dual_clip), per_token)
        clipped_tokens = clipped > unclipped
    elif kind == "cispo":
        per_token = -advantages * bounded.detach() * logprobs
        clipped_tokens = bounded != ratio
    else:
        raise ValueError(f"unknown policy loss {kind!r}")
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate(per_token, mask, agg, norm_len)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped_tokens.float(), mask),
            "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of the last dimension (tokens at -inf take no part)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs.masked_fill(log_probs.isinf(), 0.0)).sum(dim=-1)


def chunked_logprobs(hidden: torch.Tensor, head, tokens: torch.Tensor, sampling: Sampling, chunk: int,
                     seen=None, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[M] log-probs of `tokens` [M] under the logits head(hidden) [M, V], in `sampling`'s
    distribution, and their entropy if asked; `seen(index)` gives the repetition-penalty mask
    [len(index), V] of those positions. `head` is the LM head's weight [V, H] when it is a plain
    linear map, else a function of the hidden states. The logits exist `chunk` positions at a time
    and are recomputed in backward rather than kept, so memory is O(M x hidden + chunk x V)
    instead of O(M x V). A plain head under temperature alone takes the fused path
    (_FusedHeadLogprobs); the other transforms go through sampling_logits chunk by chunk."""
    if isinstance(head, torch.Tensor):
        if not (sampling.penalises or sampling.truncates):
            return _FusedHeadLogprobs.apply(hidden, head, tokens, sampling.temperature, chunk, with_entropy)
        head = functools.partial(torch.nn.functional.linear, weight=head)

    def score(part: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picked = tokens[index]
        z = sampling_logits(head(part), picked, sampling, seen(index) if sampling.penalises else None)
        logprobs = token_logprobs(z, picked)
        return logprobs, entropy_from_logits(z) if with_entropy else logprobs

    positions = torch.arange(len(tokens), device=tokens.device)
    recompute = len(tokens) > chunk and torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for start in range(0, max(len(tokens), 1), chunk):
        args = (hidden[start:start + chunk], positions[start:start + chunk])
        parts.append(torch.utils.checkpoint.checkpoint(score, *args, use_reentrant=False) if recompute
                     else score(*args))
    logprobs, entropy = (torch.cat(column) for column in zip(*parts, strict=True))
    return logprobs, entropy if with_entropy else None


class _FusedHeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[token] (and the entropy) a chunk of positions at a time, every
    [chunk, V] step done in place in one reused fp32 buffer, the logits recomputed in backward.
    Fresh [chunk, V] tensors per step (what autograd's ops make) cost about as much as the
    product itself on a 131k vocabulary: the memory is touched anew each time.

    With z = h W^T / T, p = softmax(z) and H = -sum p log p:
      d log p_t / dz = onehot(t) - p,   dH / dz = -p (log p + H)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk, with_entropy):
        count = len(tokens)
        logprobs = hidden.new_empty(count, dtype=torch.float32)
        entropy = hidden.new_empty(count, dtype=torch.float32) if with_entropy else None
        log_norm = hidden.new_empty(count, dtype=torch.float32)
        buffers = _HeadBuffers(hidden, weight, temperature, chunk, 2 if with_entropy else 1)
        for start in range(0, count, chunk):
            end = min(start + chunk, count)
            z = buffers.logits(hidden[start:end])
            picked = z.gather(1, tokens[start:end, None]).squeeze(1)
            top = z.amax(dim=1, keepdim=True)
            z.sub_(top)
            if with_entropy:
                p = torch.exp(z, out=buffers.extra[:end - start])
                total = p.sum(dim=1)
                expected = p.mul_(z).sum(dim=1) / total  # E_p[z - top]
                entropy[start:end] = total.log() - expected
            else:
                total = z.exp_().sum(dim=1)
            log_norm[start:end] = top.squeeze(1) + total.log()
            logprobs[start:end] = picked - log_norm[start:end]
        ctx.save_for_backward(hidden, weight, tokens, log_norm, *(() if entropy is None else (entropy,)))
        ctx.temperature, ctx.chunk = temperature, chunk
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, tokens, log_norm, *entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        use_entropy = bool(entropy) and grad_entropy is not None
        buffers = _HeadBuffers(hidden, weight, ctx.temperature, ctx.chunk, 2 if use_entropy else 1)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(log_norm)
        for start in range(0, len(tokens), ctx.chunk):
            end = min(start + ctx.chunk, len(tokens))
            g = grad_logprobs[start:end, None]
            log_p = buffers.logits(hidden[start:end]).sub_(log_norm[start:end, None])
            if use_entropy:  # -p (g + g_H (log p + H)), then + g at the token
                p = torch.exp(log_p, out=buffers.extra[:end - start])
                grad_z = log_p.add_(entropy[0][start:end, None]).mul_(grad_entropy[start:end, None]).add_(g) \
                    .mul_(p).neg_()
            else:
                grad_z = log_p.exp_().mul_(-g)
            grad_z.scatter_add_(1, tokens[start:end, None], g)
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            grad_z = grad_z.to(weight.dtype)
            if need_hidden:
                torch.mm(grad_z, weight, out=grad_hidden[start:end])
            if need_weight:
                grad_weight.addmm_(grad_z.t().float(), hidden[start:end].float())
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


class _HeadBuffers:
    """The reused [chunk, V] fp32 buffers of _FusedHeadLogprobs."""

    def __init__(self, hidden, weight, temperature: float, chunk: int, count: int):
        shape = (min(chunk, len(hidden)), len(weight))
        self.main = hidden.new_empty(shape, dtype=torch.float32)
        self.extra = hidden.new_empty(shape, dtype=torch.float32) if count > 1 else None
        self.weight, self.temperature = weight, temperature

    def logits(self, part: torch.Tensor) -> torch.Tensor:
        """z = part W^T / T, in the buffer."""
        z = self.main[:len(part)]
        if part.dtype == torch.float32 and self.weight.dtype == torch.float32:
            torch.mm(part, self.weight.t(), out=z)
        else:
            z.copy_(part @ self.weight.t())
        return z.div_(self.temperature) if self.temperature != 1.0 else z


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_eps: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * mean(max((V - R)^2, (V_clipped - R)^2)), V clipped to old_V +- eps (None: no clip)."""
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        loss = 0.5 * masked_mean(unclipped, mask)
        clip_frac = torch.zeros(())
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = (clipped_values - returns) ** 2
        loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
        clip_frac = masked_mean((clipped > unclipped).float(), mask).detach()
    return loss, {"clip_frac": clip_frac}


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment, per response of `lengths` tokens out of at most `max_len`:
    0 up to max_len - buffer, then falling linearly to -penalty at max_len (0 everywhere when
    buffer is 0)."""
    if buffer == 0:
        return torch.zeros(lengths.shape)
    over = (lengths.float() - (max_len - buffer)).clamp(0.0, float(buffer))
    return -penalty * over / buffer


def shape_scores(scores: torch.Tensor, valid: torch.Tensor, normalize: bool, clip: float | None,
                 like: tuple[torch.Tensor, torch.Tensor] | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Score post-processing, in order: normalise over the batch's valid samples, clip to
    [-clip, clip]. Invalid samples get 0. `like` (scores and valid flags of another batch)
    normalises by that batch's statistics instead: ReMax's greedy baseline must be on the scale of
    the samples it is subtracted from."""
    out = scores
    if normalize:
        reference, reference_valid = like if like is not None else (out, valid)
        reference_valid = reference_valid.float()
        count = reference_valid.sum().clamp(min=1.0)
        mean = (reference * reference_valid).sum() / count
        std = (((reference - mean) ** 2 * reference_valid).sum() / (count - 1).clamp(min=1.0)).sqrt()
        out = (out - mean) / (std + eps)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out * valid.float()


def informative_groups(scores: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """[G] whether each group of `group_size` consecutive samples (one prompt's) can teach anything
    to an estimator that compares them: at least two valid samples whose scores are not all equal
    (DAPO's dynamic sampling keeps only those)."""
    s, v = scores.view(-1, group_size), valid.view(-1, group_size).bool()
    highest = torch.where(v, s, float("-inf")).amax(dim=1)
    lowest = torch.where(v, s, float("inf")).amin(dim=1)
    return (v.sum(dim=1) >= 2) & (highest > lowest)


ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")
# Estimators that compare the n samples of one prompt with each other.
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def outcome_scores(scores: torch.Tensor, estimator: str, group_size: int, valid: torch.Tensor,
                   greedy_scores: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """The sequence-level signal each estimator puts on the last token, before KL and returns.

    Rows i*n .. i*n + n - 1 are the n samples of prompt i; invalid samples take no part in
    the group statistics and get 0.
      gae, reinforce_pp: the score itself (the critic or batch whitening does the rest)
      grpo: (s - group mean) / (group std + eps);  dr_grpo, reinforce_pp_baseline: s - group mean
      rloo: s - mean of the other samples of the group (0 without another valid one)
      remax: s - score of the greedy response
    """
    valid = valid.float()
    if estimator in ("gae", "reinforce_pp"):
        return scores * valid
    if estimator == "remax":
        return (scores - greedy_scores.repeat_interleave(group_size)) * valid
    s = (scores * valid).view(-1, group_size)
    v = valid.view(-1, group_size)
    count = v.sum(dim=1, keepdim=True)
    mean = s.sum(dim=1, keepdim=True) / count.clamp(min=1.0)
    if estimator in ("dr_grpo", "reinforce_pp_baseline"):
        out = s - mean
    elif estimator == "grpo":
        var = ((s - mean) ** 2 * v).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1.0)
        out = (s - mean) / (var.sqrt() + eps)
    elif estimator == "rloo":
        # A group with one valid sample has no other to compare with: no signal, as GRPO's 0.
        others = (s.sum(dim=1, keepdim=True) - s) / (count - 1).clamp(min=1.0)
        out = torch.where(count > 1, s - others, torch.zeros_like(s))
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    return (out * v).view(-1)


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """return_i = sum_{j >= i} gamma^(j - i) r_j over valid tokens (no critic)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for i in reversed(range(rewards.shape[1])):
        running = rewards[:, i] * mask[:, i] + gamma * running * mask[:, i] + running * (1 - mask[:, i])
        returns[:, i] = running * mask[:, i]
    return returns


class AdaptiveKLController:
    """Moves beta toward a target KL (Ziegler et al. 2019): beta *= 1 + clip(kl/target - 1) * n/horizon."""

    def __init__(self, init_coef: float, target: float | None, horizon: int):
        self.coef = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon


# Supervised stages: SFT and reward modelling.

def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), mean over pairs, and the accuracy."""
    margin = chosen.float() - rejected.float()
    return -torch.nn.functional.logsigmoid(margin).mean(), (margin > 0).float().mean()


PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "simpo")


def preference_loss(logps: torch.Tensor, lengths: torch.Tensor, ref_logps: torch.Tensor | None, kind: str,
                    beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.0
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation and its relatives, mean over pairs. `logps` [B, 2] are the
    policy's summed log-probs of the chosen (column 0) and rejected (1) responses of `lengths`
    tokens, `ref_logps` the frozen reference's (None for simpo). The implicit reward of a response
    is r = beta (log pi - log pi_ref), and m = r_chosen - r_rejected:

      sigmoid: -(1 - e) log sigmoid(m) - e log sigmoid(-m), DPO, with label smoothing e (cDPO: a
               share e of the pairs taken as mislabelled)
      ipo:     (m / beta - 1 / (2 beta))^2, on log-probs averaged over each response's tokens (IPO)
      hinge:   max(0, 1 - m) (SLiC)
      simpo:   the sigmoid loss of m - gamma with r = beta x the average log-prob of the response: no
               reference, rewards length-normalised, a target margin gamma (SimPO)

    Stats: the mean rewards of both responses, their mean margin m, and the accuracy (the share of
    pairs whose chosen response has the higher reward)."""
    if kind in ("ipo", "simpo"):
        logps = logps / lengths.clamp(min=1)
        ref_logps = None if ref_logps is None else ref_logps / lengths.clamp(min=1)
    rewards = beta * (logps if kind == "simpo" else logps - ref_logps)
    margin = rewards[:, 0] - rewards[:, 1]
    if kind in ("sigmoid", "simpo"):
        logits = margin - simpo_gamma if kind == "simpo" else margin
        losses = -(1 - label_smoothing) * torch.nn.functional.logsigmoid(logits) \
            - label_smoothing * torch.nn.functional.logsigmoid(-logits)
    elif kind == "ipo":
        losses = (margin / beta - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - margin)
    else:
        raise ValueError(f"unknown preference loss {kind!r}")
    rewards, margin = rewards.detach(), margin.detach()
    stats = {"rewards_chosen": rewards[:, 0].mean(), "rewards_rejected": rewards[:, 1].mean(),
             "margin": margin.mean(), "accuracy": (margin > 0).float().mean()}
    return losses.mean(), stats
