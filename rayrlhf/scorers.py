"""The frozen-model workers: the reference policy and the reward (a model or a built-in rule)."""

from __future__ import annotations

import torch

from rayrlhf.algorithms import Sampling
from rayrlhf.batch import Batch
from rayrlhf.cpu_platform import onednn_chosen, use_onednn_linear
from rayrlhf.data import reward_model_batch, same_tokenizer
from rayrlhf.modeling import (
    default_device,
    infer_in_micro_batches,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    policy_logprobs,
    sequence_scores,
)
from rayrlhf.reward_server import RemoteRewardClient
from rayrlhf.rewards import load_reward_function


def _scoring_model(model, model_cfg, device):
    """A frozen model, in eval mode on `device`, its linear layers on the configured backend."""
    if onednn_chosen(model_cfg.linear_backend):
        use_onednn_linear(model)
    return model.to(device).eval()


class ReferenceWorker:
    """log pi_ref of the sampled tokens, in the engines' sampling distribution (algorithms.Sampling)."""

    def __init__(self, model_path: str, model_cfg, micro_batch_size: int, sampling: Sampling):
        self.device = default_device()
        self.model = _scoring_model(load_causal_lm(model_path, model_cfg.dtype), model_cfg, self.device)
        self.micro_batch_size = micro_batch_size
        self.sampling = sampling

    def logprobs(self, batch: Batch) -> torch.Tensor:
        return infer_in_micro_batches(policy_logprobs, self.model, batch, self.micro_batch_size,
                                      self.device, sampling=self.sampling)


class RewardWorker:
    """The weighted sum of every configured reward source, one score per response.

    Sources: reward functions (built-in or the user's file), HF reward models read at the last
    real token, and remote reward servers. A sample whose reward cannot be computed comes back
    as NaN with the reason, so the driver can stop naming it or drop it.

    A reward model whose tokenizer is the policy's scores the sampled token ids themselves; one
    of another tokenizer (another model family) scores the texts tokenised its own way, exactly as
    the remote server does (data.reward_model_batch), with the prompt through the chat template
    when `chat_template` (data.chat_template).
    """

    def __init__(self, reward_cfg, model_cfg, chat_template: bool):
        self.device = default_device()
        self.cfg, self.chat_template = reward_cfg, chat_template
        specs = ([(reward_cfg.function, reward_cfg.function_weight)] if reward_cfg.function else []) + \
            [(spec.function, spec.weight) for spec in reward_cfg.functions]
        self.functions = [(name, weight, load_reward_function(name)) for name, weight in specs]
        policy_tokenizer = load_tokenizer(model_cfg.tokenizer or model_cfg.path) if reward_cfg.models \
            else None
        self.models = [(spec.path, spec.weight,
                        _scoring_model(load_scalar_model(spec.path, model_cfg.dtype), model_cfg, self.device),
                        _own_tokenizer(spec.path, policy_tokenizer))
                       for spec in reward_cfg.models]
        self.remotes = [(spec.url, spec.weight, RemoteRewardClient(
            spec.url, spec.token, reward_cfg.remote_timeout_s, reward_cfg.remote_retries))
            for spec in reward_cfg.remote]

    def scores(self, batch: Batch, prompts: list, responses: list[str],
               fields: dict[str, list]) -> dict:
        """{"scores": [B] (NaN where unusable), "reasons": {row: why}, "metrics": {name: [B]}}."""
        total = torch.zeros(len(prompts))
        reasons: dict[int, str] = {}
        metrics: dict[str, torch.Tensor] = {}
        for name, weight, function in self.functions:
            values, own_metrics, own_reasons = self._call_function(name, function, prompts, responses, fields)
            metrics.update(own_metrics)
            if len(self.functions) > 1:
                metrics[name] = values
            for row, why in own_reasons.items():
                reasons.setdefault(row, why)
            total += weight * values
        for path, weight, model, tokenizer in self.models:
            inputs = batch if tokenizer is None else \
                reward_model_batch(tokenizer, prompts, responses, self.chat_template)
            values = infer_in_micro_batches(sequence_scores, model, inputs, self.cfg.micro_batch_size,
                                            self.device)
            self._note_non_finite(values, f"reward model '{path}'", reasons)
            total += weight * values
        for url, weight, client in self.remotes:
            values = torch.tensor(client.score(prompts, responses, self.chat_template), dtype=torch.float32)
            self._note_non_finite(values, f"remote reward '{url}'", reasons)
            total += weight * values
        for row in reasons:
            total[row] = float("nan")
        return {"scores": total, "reasons": reasons, "metrics": metrics}

    @staticmethod
    def _note_non_finite(values: torch.Tensor, source: str, reasons: dict[int, str]) -> None:
        for row in (~torch.isfinite(values)).nonzero().flatten().tolist():
            reasons.setdefault(row, f"{source} gave {values[row].item()}")

    def _call_function(self, name, function, prompts, responses, fields) -> tuple[torch.Tensor, dict,
                                                                               dict[int, str]]:
        try:
            out = function(prompts, responses, **fields)
            values, metrics = (out.pop("reward"), out) if isinstance(out, dict) else (out, {})
            if len(values) != len(prompts):
                raise ValueError(f"returned {len(values)} values for {len(prompts)} samples")
            values = torch.tensor([float(v) for v in values], dtype=torch.float32)
            metrics = {k: torch.tensor([float(x) for x in v], dtype=torch.float32)
                       for k, v in metrics.items()}
        except Exception as err:  # noqa: BLE001 - the user's function failed; find the sample(s)
            if len(prompts) == 1:
                return (torch.tensor([float("nan")]), {},
                        {0: f"reward function '{name}' failed: {type(err).__name__}: {err}"})
            return self._call_one_by_one(name, function, prompts, responses, fields)
        reasons: dict[int, str] = {}
        self._note_non_finite(values, f"reward function '{name}'", reasons)
        return values, metrics, reasons

    def _call_one_by_one(self, name, function, prompts, responses, fields):
        """Score each sample alone, so a failure is pinned on the sample that causes it."""
        values, reasons, per_metric = [], {}, {}
        for row in range(len(prompts)):
            one, metrics, why = self._call_function(name, function, [prompts[row]], [responses[row]],
                                                    {k: [v[row]] for k, v in fields.items()})
            values.append(one)
            if why:
                reasons[row] = why[0]
            for key, value in metrics.items():
                per_metric.setdefault(key, {})[row] = value
        nan = float("nan")
        metrics = {k: torch.tensor([float(rows[r]) if r in rows else nan for r in range(len(prompts))])
                   for k, rows in per_metric.items()}
        return torch.cat(values), metrics, reasons


def _own_tokenizer(model_path: str, policy_tokenizer):
    """The reward model's tokenizer where it differs from the policy's, else None (the sampled ids
    serve). A reward model saved without one is taken to share the policy's."""
    try:
        tokenizer = load_tokenizer(model_path)
    except (OSError, ValueError):
        print(f"reward model {model_path} has no tokenizer of its own: it scores the policy's tokens",
              flush=True)
        return None
    if same_tokenizer(tokenizer, policy_tokenizer):
        return None
    print(f"reward model {model_path} has another tokenizer than the policy: it scores the texts "
          "tokenised its own way", flush=True)
    return tokenizer
