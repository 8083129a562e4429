"""The PPO driver: sample -> feedback -> learn -> refresh the engines, once per iteration."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rayrlhf import algorithms as alg
from rayrlhf.batch import Batch
from rayrlhf.checkpoint import checkpoint_dir, prune, read_state, resolve_resume, write_state
from rayrlhf.cluster import start_ray
from rayrlhf.data import Prompt, PromptSampler, load_prompts
from rayrlhf.errors import Interrupted, ModelError, RewardError
from rayrlhf.metrics import MetricsLog, StageTimer
from rayrlhf.rewards import load_reward_function
from rayrlhf.system import RLHFSystem, Rollout
from rayrlhf.tiny import ensure_tiny_model


def train(cfg: DictConfig) -> list[dict[str, float]]:
    """Runs PPO (or a critic-free relative) as configured; returns the per-iteration metrics."""
    output_dir = Path(cfg.output_dir)
    tokenizer = prepare_models(cfg)
    prompts = load_prompts(cfg.data, tokenizer, cfg.reward.function, cfg.seed)
    sampler = PromptSampler(prompts, cfg.trainer.prompts_per_step, cfg.seed)
    eval_prompts = load_prompts(cfg.data, tokenizer, cfg.reward.function, cfg.seed + 1,
                                path=cfg.eval.path, size=cfg.eval.size)[:cfg.eval.size] \
        if cfg.eval.every else []
    resume_from = resolve_resume(cfg.resume, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    algo = cfg.algorithm
    started_ray = start_ray(cfg.ray)
    system, log, history = None, None, []
    stop = GracefulStop()
    try:
        system = RLHFSystem(cfg, tokenizer.pad_token_id)
        print(f"placed: {system.placement()}", flush=True)
        kl_ctl = alg.AdaptiveKLController(algo.kl_coef, algo.kl_target or None, algo.kl_horizon)
        first_step = 1 if resume_from is None else resume(system, resume_from, kl_ctl, sampler)
        log = MetricsLog(output_dir, cfg.trainer.total_steps, first_step)
        for step in range(first_step, cfg.trainer.total_steps + 1):
            timer = StageTimer()
            batch_prompts = sampler.next_batch()
            with timer("generate"):
                rollout = system.generate(batch_prompts, step)
                greedy = system.generate(batch_prompts, step, greedy=True) if algo.estimator == "remax" \
                    else None
            with timer("experience"):
                feedback = apply_rewards(rollout, system.rewards(rollout), cfg.reward)
                baseline = None
                if greedy is not None:
                    apply_rewards(greedy, system.rewards(greedy), cfg.reward)
                    baseline = greedy.batch["scores"]
                system.model_outputs(rollout.batch)
                feedback |= add_advantages(rollout.batch, algo, kl_ctl.coef, cfg.rollout.n, baseline)
            with timer("train"):
                learn = system.train(rollout.batch, seed=cfg.seed + step, kl_coef=kl_ctl.coef)
            if "kl/mean" in feedback:
                kl_ctl.update(feedback["kl/mean"], len(rollout.batch))
            with timer("weight_sync"):
                sync_bytes = system.sync_weights()
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                save_policy(system, tokenizer, output_dir / f"policy_step{step}")
            if cfg.eval.every and step % cfg.eval.every == 0:
                with timer("eval"):
                    feedback |= evaluate(system, eval_prompts, step, cfg.eval.greedy)

            metrics = step_metrics(step, rollout.batch, feedback, learn, sync_bytes, timer, cfg.weight_sync)
            log.log(metrics)
            history.append(metrics)
            every = cfg.trainer.checkpoint_every
            if (every and step % every == 0) or stop.signum:
                saved = save_checkpoint(system, output_dir, step, kl_ctl, sampler,
                                        cfg.trainer.keep_checkpoints)
                if stop.signum:
                    raise Interrupted(f"stopped by signal {stop.signum} after step {step}; checkpoint in "
                                      f"{saved}; to continue, run the same command with resume=true",
                                      stop.signum)
        save_policy(system, tokenizer, output_dir / "policy")
    finally:
        stop.restore()
        if log is not None:
            log.close()
        if system is not None:
            system.shutdown()
        if started_ray:
            ray.shutdown()
    return history


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second
    signal interrupts at once."""

    def __init__(self):
        self.signum = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # only there can Python catch them
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"signal {signum}: saving a checkpoint and stopping after this step "
                   "(signal again to stop at once)")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def save_checkpoint(system: RLHFSystem, output_dir: Path, step: int, kl_ctl, sampler: PromptSampler,
                    keep: int) -> Path:
    path = checkpoint_dir(output_dir, step)
    system.save_checkpoint(str(path))
    write_state(path, {"step": step, "kl_coef": kl_ctl.coef, "sampler": sampler.state()})
    prune(output_dir, keep)
    return path


def resume(system: RLHFSystem, path: Path, kl_ctl, sampler: PromptSampler) -> int:
    """Restores trainers (and the engines' weights), KL controller and data position; returns
    the first step to run."""
    system.load_checkpoint(str(path))
    state = read_state(path)
    kl_ctl.coef = state["kl_coef"]
    sampler.restore(state["sampler"])
    tqdm.write(f"resumed from {path} after step {state['step']}")
    return state["step"] + 1


def apply_rewards(rollout: Rollout, rewards: dict, reward_cfg) -> dict[str, float]:
    """Checks the reward workers' output, then puts the shaped scores into the batch.

    An unusable reward stops the run naming the sample, unless reward.skip_invalid, which drops
    the sample from training (its mask becomes 0) and counts it.
    """
    scores, reasons, batch = rewards["scores"], rewards["reasons"], rollout.batch
    if reasons and (not reward_cfg.skip_invalid or len(reasons) == len(scores)):
        row = min(reasons)
        hint = "every sample of the batch failed" if reward_cfg.skip_invalid else \
            "set reward.skip_invalid=true to drop such samples"
        raise RewardError(f"reward for sample {row} is unusable: {reasons[row]} ({len(reasons)} such in "
                          f"the batch; {hint}); prompt {rollout.prompts[row][:80]!r}, "
                          f"response {rollout.responses[row][:80]!r}")
    valid = torch.isfinite(scores)
    raw = scores.nan_to_num(0.0)
    batch["valid"] = valid.float()
    batch["mask"] = batch["mask"] * batch["valid"][:, None]
    batch["scores"] = alg.shape_scores(raw, batch["truncated"], valid, reward_cfg.truncated_penalty,
                                       reward_cfg.normalize, reward_cfg.clip or None)
    metrics = {"reward/mean": raw[valid].mean().item(),
               "reward/std": raw[valid].std().item() if valid.sum() > 1 else 0.0,
               "reward/invalid": float(len(reasons))}
    for key, values in rewards["metrics"].items():
        metrics[f"reward/{key}"] = values[valid].nanmean().item()
    return metrics


def add_advantages(batch: Batch, algo, kl_coef: float, group_size: int,
                   greedy_scores: torch.Tensor | None = None) -> dict[str, float]:
    """Per-token rewards (KL penalty and the estimator's outcome signal), then advantages and
    returns: GAE with the critic, or discounted returns for the critic-free estimators."""
    mask = batch["mask"]
    outcome = alg.outcome_scores(batch["scores"], algo.estimator, group_size, batch["valid"],
                                 greedy_scores)
    stats = {"kl/coef": kl_coef}
    kl = torch.zeros_like(mask)
    if "ref_logprobs" in batch.tensors:
        kl = alg.kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], algo.kl_estimator) * mask
        k1 = alg.kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], "k1") * mask
        stats["kl/mean"] = (k1.sum(dim=1) * batch["valid"]).sum().item() / max(batch["valid"].sum().item(), 1)
    rewards = alg.token_rewards(outcome, kl, mask, kl_coef if algo.kl_in == "reward" else 0.0)
    if algo.estimator == "gae":
        advantages, returns = alg.gae(rewards, batch["old_values"], mask, algo.gamma, algo.lam)
        if algo.whiten_advantages:
            advantages = alg.whiten(advantages, mask)
        stats["values/mean"] = alg.masked_mean(batch["old_values"], mask).item()
    else:
        returns = alg.discounted_returns(rewards, mask, algo.gamma)
        advantages = alg.whiten(returns, mask) if algo.estimator.startswith("reinforce_pp") else returns
    batch["advantages"], batch["returns"] = advantages, returns
    stats["returns/mean"] = alg.masked_mean(returns, mask).item()
    return stats


def evaluate(system: RLHFSystem, prompts: list[Prompt], step: int, greedy: bool) -> dict[str, float]:
    """Held-out prompts through the current policy and the reward sources (nothing trains on them)."""
    rollout = system.generate(prompts, step, greedy=greedy)
    rewards = system.rewards(rollout)
    valid = torch.isfinite(rewards["scores"])
    metrics = {"eval/reward_mean": rewards["scores"][valid].mean().item() if valid.any() else float("nan"),
               "eval/invalid": float((~valid).sum()),
               "eval/response_length_mean": rollout.batch["response_lengths"].float().mean().item()}
    for key, values in rewards["metrics"].items():
        metrics[f"eval/{key}"] = values[valid].nanmean().item()
    return metrics


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


def prepare_models(cfg: DictConfig):
    """Build the tiny model if asked, check every model path, and return the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    if cfg.reward.function:
        load_reward_function(cfg.reward.function)  # fails here, before any actor starts
    checks = {f"reward.models[{i}].path": spec.path for i, spec in enumerate(cfg.reward.models)}
    checks |= {"critic.model_path": cfg.critic.model_path, "model.tokenizer": cfg.model.tokenizer,
               "model.path": cfg.model.path}
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

