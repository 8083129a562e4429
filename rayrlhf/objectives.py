"""What each trainer role optimises: its kind of model, its loss on a micro-batch and the units that
loss averages over, and, where the role has them, its inference and its held-out sums.

One class per role, chosen once by name (`OBJECTIVES`), so the trainer worker holds no role
switches: a new stage is a new class and a registry line. The math stays in `algorithms`, the
forwards in `modeling`; an objective only says which of them its role calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rayrlhf.algorithms import (
    Sampling,
    aggregate,
    kl_estimate,
    pairwise_loss,
    policy_loss,
    preference_loss,
    value_loss,
)
from rayrlhf.batch import Batch, build_batch, pair_rows
from rayrlhf.modeling import (
    pair_scores,
    policy_logprobs,
    policy_logprobs_and_entropy,
    sft_token_logprobs,
    to_device,
    token_values,
)

Stats = dict[str, torch.Tensor]


@dataclass
class Objective:
    """`packing` is how PPO batches are laid out for the model (see modeling._scoring_inputs);
    `algo`, `sampling` (the engines' sampling distribution) and `norm_len` are the PPO loss
    settings. The supervised objectives use none of them."""

    packing: str = "none"
    algo: object = None
    sampling: Sampling = field(default_factory=Sampling)
    norm_len: int = 1

    causal_lm = True  # else a scalar head on the backbone

    @classmethod
    def of(cls, role_cfg, algo=None, sampling: Sampling = Sampling(), norm_len: int = 1) -> Objective:
        """The objective of a role with these settings (`role_cfg`: the role's config section)."""
        return cls()

    def loss(self, module, batch: Batch, **kwargs) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def units(self, batch: Batch) -> torch.Tensor:
        """Per row, what the loss averages over (the trainer weighs micro-batches by them)."""
        raise NotImplementedError

    def infer(self, module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no per-token inference")

    def held_out_sums(self, module, batch: Batch) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} has no held-out evaluation")

    @staticmethod
    def held_out_metrics(sums: dict[str, float]) -> dict[str, float]:
        """The held-out metrics from held_out_sums added up over micro-batches and ranks."""
        raise NotImplementedError

    @staticmethod
    def old_from_forward(batch: Batch) -> bool:
        """Whether the training forward itself gives the batch's pi_old log-probs (see PolicyObjective)."""
        return False

    def compile_ahead(self, module, device: torch.device) -> None:
        """Runs what torch.compile compiles at a step's first forward and backward, for the roles
        that can (the others compile at their first step)."""

    @property
    def keeps_prompt_groups(self) -> bool:
        """Whether the responses to one prompt share its computation, so must stay together."""
        return self.packing == "prompts"


class _PPOObjective(Objective):
    @classmethod
    def of(cls, role_cfg, algo=None, sampling: Sampling = Sampling(), norm_len: int = 1) -> Objective:
        packing = ("prompts" if role_cfg.share_prompts else "samples") if role_cfg.packing else "none"
        return cls(packing=packing, algo=algo, sampling=sampling, norm_len=norm_len)

    def compile_ahead(self, module, device: torch.device) -> None:
        """One forward and backward of a made-up batch in the PPO layout. Its gradients go nowhere:
        `autograd.grad` leaves `.grad` and DeepSpeed's hooks untouched."""
        # Two prompt groups of uneven lengths, so that no size the model sees is 0 or 1 and no
        # two are equal by chance (as packed rows without end padding would make the token count
        # and the grid's): torch specialises sizes 0 and 1 and ties equal ones, and a real batch
        # that differed would compile again at the first step.
        prompts, responses = [[4, 5, 6]] * 2 + [[7, 8]] * 2, [[10, 11, 12], [13, 14], [15, 16], [17]]
        batch = to_device(build_batch(prompts, responses, 0), device)
        module.train()
        out = self.infer(module, batch)
        weight = next(p for p in module.parameters() if p.requires_grad)
        torch.autograd.grad(out.sum(), [weight], allow_unused=True)


@dataclass
class PolicyObjective(_PPOObjective):
    """The PPO actor: the clipped surrogate (with the configured aggregation, truncated importance
    weights toward the engines' samples, entropy bonus and KL term)."""

    def __post_init__(self) -> None:
        self.forward_logprobs: list[torch.Tensor] = []

    def loss(self, module, batch: Batch, kl_coef: float = 0.0) -> tuple[torch.Tensor, Stats]:
        algo, mask = self.algo, batch["mask"]
        logprobs, entropy = policy_logprobs_and_entropy(module, batch, self.sampling,
                                                        with_entropy=algo.entropy_coef > 0,
                                                        packing=self.packing)
        if self.old_from_forward(batch):  # the only optimizer step of the batch: pi_old is this forward
            old_logprobs = logprobs.detach()
            self.forward_logprobs.append(old_logprobs.float().cpu())
        else:
            old_logprobs = batch["old_logprobs"]
        is_weights = None
        if algo.tis_cap is not None:
            # The samples came from the engine's policy; correct toward the trainer's pi_old.
            is_weights = torch.exp(old_logprobs - batch["engine_logprobs"]).clamp(max=algo.tis_cap)
        loss, stats = policy_loss(logprobs, old_logprobs, batch["advantages"], mask,
                                  algo.clip_eps, algo.clip_eps_high, algo.dual_clip, algo.loss_agg,
                                  self.norm_len, is_weights, algo.policy_loss, algo.ratio_level)
        out = {"loss/policy": loss.detach(), **{f"policy/{k}": v for k, v in stats.items()}}
        if entropy is not None:
            entropy_term = aggregate(entropy, mask, algo.loss_agg, self.norm_len)
            loss = loss - algo.entropy_coef * entropy_term
            out["policy/entropy"] = entropy_term.detach()
        if algo.kl_in == "loss" and kl_coef > 0:
            kl = aggregate(kl_estimate(logprobs, batch["ref_logprobs"], algo.kl_estimator), mask,
                           algo.loss_agg, self.norm_len)
            loss = loss + kl_coef * kl
            out["loss/kl"] = kl.detach()
        return loss, out

    @staticmethod
    def old_from_forward(batch: Batch) -> bool:
        """A batch without old log-probs takes its pi_old from the training forward itself."""
        return "old_logprobs" not in batch.tensors

    def take_forward_logprobs(self) -> list[torch.Tensor]:
        """The log-probs the training forwards found since the last call, micro-batch by micro-batch."""
        taken, self.forward_logprobs = self.forward_logprobs, []
        return taken

    def units(self, batch: Batch) -> torch.Tensor:
        if self.algo.loss_agg == "token_mean":
            return batch["mask"].sum(1)
        return (batch["mask"].sum(1) > 0).float()  # a response with a valid token

    def infer(self, module, batch: Batch) -> torch.Tensor:
        return policy_logprobs(module, batch, self.sampling, self.packing).float()


class ValueObjective(_PPOObjective):
    """The PPO critic: the (optionally clipped) value loss toward the returns."""

    causal_lm = False

    def loss(self, module, batch: Batch, kl_coef: float = 0.0) -> tuple[torch.Tensor, Stats]:
        """(The PPO step's KL coefficient is the actor's business.)"""
        values = token_values(module, batch, self.packing)
        clip = self.algo.value_clip_eps or None
        loss, stats = value_loss(values, batch["old_values"], batch["returns"], batch["mask"], clip)
        return loss, {"loss/value": loss.detach(), "critic/clip_frac": stats["clip_frac"]}

    def units(self, batch: Batch) -> torch.Tensor:
        return batch["mask"].sum(1)

    def infer(self, module, batch: Batch) -> torch.Tensor:
        return token_values(module, batch, self.packing)


class SFTObjective(Objective):
    """Next-token loss on the response tokens."""

    def loss(self, module, batch: Batch) -> tuple[torch.Tensor, Stats]:
        nll, tokens = self._nll(module, batch)
        loss = nll / tokens.clamp(min=1)
        return loss, {"loss/sft": loss.detach()}

    def units(self, batch: Batch) -> torch.Tensor:
        return batch["loss_mask"][:, 1:].sum(1).float()

    def held_out_sums(self, module, batch: Batch) -> dict[str, float]:
        nll, tokens = self._nll(module, batch)
        return {"nll": float(nll), "tokens": float(tokens)}

    @staticmethod
    def held_out_metrics(sums: dict[str, float]) -> dict[str, float]:
        return {"eval/loss": sums["nll"] / max(sums["tokens"], 1)}

    @staticmethod
    def _nll(module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood of the response tokens, and their count."""
        return -sft_token_logprobs(module, batch).sum(), batch["loss_mask"][:, 1:].sum()


class PairwiseRewardObjective(Objective):
    """Reward-model training: -log sigmoid(r_chosen - r_rejected) over preference pairs."""

    causal_lm = False

    def loss(self, module, batch: Batch) -> tuple[torch.Tensor, Stats]:
        scores, loss, accuracy = self._scored(module, batch)
        return loss, {"loss/rm": loss.detach(), "rm/accuracy": accuracy,
                      "rm/margin": (scores[:, 0] - scores[:, 1]).mean().detach()}

    def units(self, batch: Batch) -> torch.Tensor:
        return torch.ones(len(batch))

    def held_out_sums(self, module, batch: Batch) -> dict[str, float]:
        _, loss, accuracy = self._scored(module, batch)
        pairs = len(batch)
        return {"loss": float(loss) * pairs, "correct": float(accuracy) * pairs, "pairs": pairs}

    @staticmethod
    def held_out_metrics(sums: dict[str, float]) -> dict[str, float]:
        return {"eval/accuracy": sums["correct"] / sums["pairs"], "eval/loss": sums["loss"] / sums["pairs"]}

    @staticmethod
    def _scored(module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores [B, 2] of the pairs, the pairwise loss and the accuracy."""
        scores = pair_scores(module, batch)
        return scores, *pairwise_loss(scores[:, 0], scores[:, 1])


@dataclass
class PreferenceObjective(Objective):
    """DPO and its relatives (algorithms.preference_loss) on preference pairs laid out by
    data.preference_batch, against the reference log-probs each batch carries (`ref_logps` [B, 2],
    none for SimPO); `infer` gives the policy's own, which the ranks compute once before training."""

    loss_kind: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.0

    @classmethod
    def of(cls, role_cfg, algo=None, sampling: Sampling = Sampling(), norm_len: int = 1) -> Objective:
        return cls(packing="prompts" if role_cfg.packing else "none", loss_kind=role_cfg.loss,
                   beta=role_cfg.beta, label_smoothing=role_cfg.label_smoothing,
                   simpo_gamma=role_cfg.simpo_gamma)

    @property
    def needs_reference(self) -> bool:
        return self.loss_kind != "simpo"

    @property
    def keeps_prompt_groups(self) -> bool:
        """A pair shares its prompt within its own row: rows need not stay together."""
        return False

    def loss(self, module, batch: Batch) -> tuple[torch.Tensor, Stats]:
        loss, stats = self._scored(module, batch)
        return loss, {"loss/dpo": loss.detach(), **{f"dpo/{k}": v for k, v in stats.items()}}

    def units(self, batch: Batch) -> torch.Tensor:
        return torch.ones(len(batch))

    def infer(self, module, batch: Batch) -> torch.Tensor:
        return self._sequence_logps(module, batch)

    def held_out_sums(self, module, batch: Batch) -> dict[str, float]:
        loss, stats = self._scored(module, batch)
        pairs = len(batch)
        return {"pairs": pairs, **{k: float(v) * pairs for k, v in {"loss": loss, **stats}.items()}}

    @staticmethod
    def held_out_metrics(sums: dict[str, float]) -> dict[str, float]:
        return {f"eval/{k}": v / sums["pairs"] for k, v in sums.items() if k != "pairs"}

    def _scored(self, module, batch: Batch) -> tuple[torch.Tensor, Stats]:
        return preference_loss(self._sequence_logps(module, batch), batch["response_lengths"],
                               batch["ref_logps"] if self.needs_reference else None, self.loss_kind,
                               self.beta, self.label_smoothing, self.simpo_gamma)

    def _sequence_logps(self, module, batch: Batch) -> torch.Tensor:
        """[B, 2] summed log-probs of each pair's chosen and rejected responses (with packing, both
        follow one copy of the prompt)."""
        logprobs = policy_logprobs(module, pair_rows(batch), Sampling(), self.packing)
        return logprobs.sum(dim=1).view(len(batch), 2)


OBJECTIVES: dict[str, type[Objective]] = {
    "actor": PolicyObjective,
    "critic": ValueObjective,
    "sft": SFTObjective,
    "rm": PairwiseRewardObjective,
    "dpo": PreferenceObjective,
}
