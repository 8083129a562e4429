"""The frozen-model workers: the reference policy and the reward (a model or a built-in rule)."""

from __future__ import annotations

import torch

from rayrlhf.batch import Batch
from rayrlhf.modeling import (
    default_device,
    infer_in_micro_batches,
    load_causal_lm,
    load_scalar_model,
    policy_logprobs,
    sequence_scores,
)
from rayrlhf.rewards import RULES


class ReferenceWorker:
    """log pi_ref of the sampled tokens, under the rollout temperature."""

    def __init__(self, model_path: str, dtype: str, micro_batch_size: int, temperature: float):
        self.device = default_device()
        self.model = load_causal_lm(model_path, dtype).to(self.device).eval()
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature

    def logprobs(self, batch: Batch) -> torch.Tensor:
        return infer_in_micro_batches(policy_logprobs, self.model, batch, self.micro_batch_size,
                                      self.device, temperature=self.temperature)


class RewardWorker:
    """One score per response: an HF reward model read at the last real token, or a rule on the text."""

    def __init__(self, reward_cfg, dtype: str):
        self.device = default_device()
        self.micro_batch_size = reward_cfg.micro_batch_size
        if reward_cfg.model_path:
            self.model = load_scalar_model(reward_cfg.model_path, dtype).to(self.device).eval()
            self.rule = None
        else:
            self.model = None
            self.rule = RULES[reward_cfg.rule]

    def scores(self, batch: Batch, prompts: list[str], responses: list[str]) -> torch.Tensor:
        if self.rule is not None:
            return torch.tensor([self.rule(p, r) for p, r in zip(prompts, responses, strict=True)],
                                dtype=torch.float32)
        return infer_in_micro_batches(sequence_scores, self.model, batch, self.micro_batch_size,
                                      self.device)
