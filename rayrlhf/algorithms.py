"""The PPO math for language models, as plain functions of tensors.

Shapes: B sequences, N response tokens. `mask` is 1.0 on valid response tokens (up to and
including EOS) and 0.0 on padding. Nothing here knows about Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import torch


def response_logprobs(logits: torch.Tensor, sequences: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the response tokens of `sequences` under `logits`.

    `sequences` is [B, P + N] with every prompt left-padded to P, so response token j sits at
    column P + j and is scored by the logits at column P + j - 1. Temperature divides the
    logits first, as the sampler did when it drew the tokens.
    """
    response = sequences[:, prompt_len:]
    scoring = logits[:, prompt_len - 1:-1].float() / temperature
    picked = scoring.gather(-1, response.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scoring, dim=-1)


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


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(pi || pi_ref): log pi - log pi_ref."""
    return logprobs - ref_logprobs


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """r_i = -beta * kl_i on every valid token, plus the sequence score on the last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


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


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: -mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = masked_mean(-torch.min(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


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
