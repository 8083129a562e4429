"""The PPO driver: sample -> feedback -> learn -> refresh the engines, once per iteration."""

from __future__ import annotations

from pathlib import Path

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rayrlhf import algorithms as alg
from rayrlhf.batch import Batch
from rayrlhf.cluster import start_ray
from rayrlhf.data import PromptSampler, load_prompts
from rayrlhf.errors import ModelError, RewardError
from rayrlhf.metrics import MetricsLog, StageTimer
from rayrlhf.system import RLHFSystem
from rayrlhf.tiny import ensure_tiny_model


def train(cfg: DictConfig) -> list[dict[str, float]]:
    """Runs PPO as configured; returns the per-iteration metrics (also in metrics.jsonl)."""
    output_dir = Path(cfg.output_dir)
    tokenizer = prepare_models(cfg)
    prompts = load_prompts(cfg.data, tokenizer, cfg.reward.rule, cfg.seed)
    sampler = PromptSampler(prompts, cfg.trainer.prompts_per_step, cfg.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    started_ray = start_ray(cfg.ray)
    system, log, history = None, None, []
    try:
        system = RLHFSystem(cfg, tokenizer.pad_token_id)
        kl_ctl = alg.AdaptiveKLController(cfg.algorithm.kl_coef, cfg.algorithm.kl_target or None,
                                          cfg.algorithm.kl_horizon)
        log = MetricsLog(output_dir, cfg.trainer.total_steps)
        for step in range(1, cfg.trainer.total_steps + 1):
            timer = StageTimer()
            with timer("generate"):
                batch, prompt_texts, response_texts = system.generate(sampler.next_batch())
            with timer("experience"):
                system.score(batch, prompt_texts, response_texts)
                check_scores(batch["scores"], prompt_texts, response_texts)
                feedback = add_advantages(batch, cfg.algorithm, kl_ctl.coef)
            with timer("train"):
                learn = system.train(batch, seed=cfg.seed + step)
            kl_ctl.update(feedback["kl/mean"], len(batch))
            with timer("weight_sync"):
                sync_bytes = system.sync_weights()
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                save_policy(system, tokenizer, output_dir / f"policy_step{step}")

            metrics = step_metrics(step, batch, feedback, learn, sync_bytes, timer, cfg.weight_sync)
            log.log(metrics)
            history.append(metrics)
        save_policy(system, tokenizer, output_dir / "policy")
    finally:
        if log is not None:
            log.close()
        if system is not None:
            system.shutdown()
        if started_ray:
            ray.shutdown()
    return history


def add_advantages(batch: Batch, algo, kl_coef: float) -> dict[str, float]:
    """Per-token rewards with the KL penalty, then GAE; adds `advantages` and `returns`."""
    mask = batch["mask"]
    kl = alg.kl_penalty(batch["old_logprobs"], batch["ref_logprobs"]) * mask
    rewards = alg.token_rewards(batch["scores"], kl, mask, kl_coef)
    advantages, returns = alg.gae(rewards, batch["old_values"], mask, algo.gamma, algo.lam)
    if algo.whiten_advantages:
        advantages = alg.whiten(advantages, mask)
    batch["advantages"], batch["returns"] = advantages, returns
    return {
        "reward/mean": batch["scores"].mean().item(),
        "reward/std": batch["scores"].std().item() if len(batch) > 1 else 0.0,
        "kl/mean": kl.sum(dim=1).mean().item(),
        "returns/mean": alg.masked_mean(returns, mask).item(),
        "values/mean": alg.masked_mean(batch["old_values"], mask).item(),
        "kl/coef": kl_coef,
    }


def step_metrics(step: int, batch: Batch, feedback: dict, learn: dict, sync_bytes: int,
                 timer: StageTimer, sync_cfg) -> dict[str, float]:
    metrics = {"step": step, **feedback, **learn, **timer.metrics(),
               "response/length_mean": batch["response_lengths"].float().mean().item(),
               "response/truncated_frac": batch["truncated"].mean().item(),
               "sync/bytes": sync_bytes}
    metrics["sync/gb_per_s"] = sync_bytes / 1e9 / max(metrics["time/weight_sync"], 1e-9)
    metrics["throughput/tokens_per_s"] = batch["mask"].sum().item() / metrics["time/step"]
    if sync_cfg.check_every and step % sync_cfg.check_every == 0:
        metrics.update(logprob_gap(batch, sync_cfg.warn_gap, step))
    return metrics


def logprob_gap(batch: Batch, warn_gap: float, step: int) -> dict[str, float]:
    """Engine vs trainer log-probs of the same sampled tokens (both under the same weights)."""
    gap = (batch["engine_logprobs"] - batch["old_logprobs"]).abs()
    mean = alg.masked_mean(gap, batch["mask"]).item()
    if mean > warn_gap:
        tqdm.write(f"warning: step {step}: engine and trainer log-probs differ by {mean:.4f} on "
                   f"average (weight_sync.warn_gap={warn_gap}); the engines may hold stale weights")
    return {"sync/logprob_gap_mean": mean, "sync/logprob_gap_max": (gap * batch["mask"]).max().item()}


def check_scores(scores: torch.Tensor, prompts: list[str], responses: list[str]) -> None:
    """A NaN or infinite reward stops the run before anything trains on it."""
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise RewardError(f"reward for sample {i} is {scores[i].item()} ({len(bad)} non-finite in the "
                          f"batch); prompt {prompts[i][:80]!r}, response {responses[i][:80]!r}")


def prepare_models(cfg: DictConfig):
    """Build the tiny model if asked, check every model path, and return the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    checks = {"reward.model_path": cfg.reward.model_path, "critic.model_path": cfg.critic.model_path,
              "model.tokenizer": cfg.model.tokenizer, "model.path": cfg.model.path}
    for key, path in checks.items():
        if not path:
            continue
        if key == "model.path" and cfg.model.build_tiny:
            ensure_tiny_model(path, seed=cfg.seed)
        looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1
        if looks_local and not Path(path).expanduser().exists():
            raise ModelError(f"{key} '{path}' does not exist")
        try:
            if key == "model.tokenizer":
                AutoTokenizer.from_pretrained(path)
            else:
                AutoConfig.from_pretrained(path)
        except Exception as err:  # noqa: BLE001 - any loader failure means an unusable path
            raise ModelError(f"{key} '{path}' cannot be loaded: {str(err).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_policy(system: RLHFSystem, tokenizer, path: Path) -> None:
    system.save_policy(str(path))
    tokenizer.save_pretrained(path)

