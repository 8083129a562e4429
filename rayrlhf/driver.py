"""The PPO driver: sample -> feedback -> learn -> refresh the engines, once per iteration."""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rayrlhf import algorithms as alg
from rayrlhf.agent import environment_class
from rayrlhf.batch import Batch
from rayrlhf.checkpoint import (
    PPO_RESUME_KEYS,
    GracefulStop,
    check_resumable,
    checkpoint_dir,
    complete_checkpoints,
    prune,
    resolve_resume,
    write_state,
)
from rayrlhf.cluster import NodeLost, node_label, start_ray
from rayrlhf.data import PromptSampler, load_prompts
from rayrlhf.errors import EnvironmentFailure, Interrupted, RayRLHFError, RewardError
from rayrlhf.evaluation import held_out_prompts, rule_scores
from rayrlhf.metrics import MetricsLog, StageTimer
from rayrlhf.modeling import check_model_path, load_tokenizer
from rayrlhf.rewards import load_reward_function
from rayrlhf.rollout import response_budget
from rayrlhf.rollout_service import Rollout, RolloutService, join_rollouts
from rayrlhf.system import RLHFSystem
from rayrlhf.tiny import ensure_tiny_model


def train(cfg: DictConfig, after_step: Callable[[dict], None] | None = None) -> list[dict[str, float]]:
    """Runs PPO (or a critic-free relative) as configured; returns the per-iteration metrics.
    `after_step` gets each iteration's metrics once they are logged (the bench paces TRL by it)."""
    output_dir = Path(cfg.output_dir)
    tokenizer = prepare_models(cfg)
    prompts = load_prompts(cfg.data, tokenizer, cfg.seed)
    sampler = PromptSampler(prompts, prompts_per_round(cfg), cfg.seed)
    evaluator = Evaluator(cfg, tokenizer) if cfg.eval.every else None
    resume_from = resolve_resume(cfg.resume, output_dir)
    resumed = None if resume_from is None else check_resumable(resume_from, cfg, PPO_RESUME_KEYS)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    algo = cfg.algorithm
    started_ray = start_ray(cfg.ray)
    system, log, history = None, None, []
    stop = GracefulStop()
    try:
        system = RLHFSystem(cfg, tokenizer.pad_token_id)
        print(f"placed: {system.placement()}; weight sync by {system.rollout.weights.transport}", flush=True)
        kl_ctl = alg.AdaptiveKLController(algo.kl_coef, algo.kl_target or None, algo.kl_horizon)
        ahead = cfg.trainer.max_staleness if cfg.trainer.async_rollout else 0
        rollouts = RolloutQueue(system.rollout, sampler, ahead, cfg.trainer.total_steps)
        dynamic = DynamicSampling(cfg, system, sampler) if algo.dynamic_sampling.enable else None
        first_step = 1 if resume_from is None else resume(system, resume_from, resumed, kl_ctl, rollouts)
        log = MetricsLog(output_dir, cfg.trainer.total_steps, first_step, logging_cfg=cfg.logging,
                         config=OmegaConf.to_container(cfg, resolve=True))
        if evaluator and cfg.eval.before_training and first_step == 1:
            log.log({"step": 0, **evaluator(system, 0)}, advance=False)
        separate_old_logprobs = needs_old_logprob_pass(cfg)
        for step in range(first_step, cfg.trainer.total_steps + 1):
            timer = StageTimer()
            with timer("generate"):
                rollout, staleness = rollouts.next(step)
                greedy = None
                if algo.estimator == "remax":  # the greedy baseline of the same prompts
                    greedy = system.rollout.generate(rollout.source, step, greedy=True)
            with timer("experience"):
                score_rollout(rollout, system.rewards(rollout), cfg)
            feedback = {}
            if dynamic is not None:  # more prompts, until the step has enough groups that teach anything
                rollout, feedback = dynamic.fill(rollout, step, timer)
            with timer("generate"):
                system.rollout.release()  # rollout.sleep: their GPU memory is the trainers' until the sync
            with timer("experience"):
                feedback |= shape_rewards(rollout, cfg.reward)
                if cfg.logging.samples_per_step:
                    log.samples(sample_records(step, rollout, cfg.logging.samples_per_step))
                baseline = None
                if greedy is not None:
                    score_rollout(greedy, system.rewards(greedy), cfg)
                    shape_rewards(greedy, cfg.reward, like=rollout)
                    baseline = greedy.batch["scores"]
                system.model_outputs(rollout.batch, old_logprobs=separate_old_logprobs)
                feedback |= add_advantages(rollout.batch, algo, kl_ctl.coef, cfg.rollout.n, baseline)
            with timer("train"):
                learn = system.train(rollout.batch, seed=cfg.seed + step, kl_coef=kl_ctl.coef)
            feedback |= kl_metrics(rollout.batch)
            if "kl/mean" in feedback:
                kl_ctl.update(feedback["kl/mean"], len(rollout.batch))
            with timer("weight_sync"):
                sync_bytes = system.rollout.sync_weights()
            feedback["rollout/generating_at_sync"] = system.rollout.generations_in_progress()
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                save_policy(system, tokenizer, output_dir / f"policy_step{step}")
            if evaluator and (step % cfg.eval.every == 0 or step == cfg.trainer.total_steps):
                with timer("eval"):
                    feedback |= evaluator(system, step)

            metrics = step_metrics(step, rollout.batch, feedback, learn, sync_bytes, timer, cfg.weight_sync,
                                   staleness)
            metrics |= system.memory() | system.clock.take()
            log.log(metrics)
            history.append(metrics)
            if after_step is not None:
                after_step(metrics)
            every = cfg.trainer.checkpoint_every
            if (every and step % every == 0) or stop.signum:
                saved = save_checkpoint(system, cfg, step, kl_ctl, rollouts)
                if stop.signum:
                    raise Interrupted(f"stopped by signal {stop.signum} after step {step}; checkpoint in "
                                      f"{saved}; to continue, run the same command with resume=true",
                                      stop.signum)
        save_policy(system, tokenizer, output_dir / "policy")
    except (ray.exceptions.RayActorError, NodeLost) as err:
        raise roles_lost(err, system, output_dir) from None
    finally:
        stop.restore()
        if log is not None:
            log.close()
        if system is not None:
            system.shutdown()
        if started_ray:
            ray.shutdown()
    return history


class RolloutQueue:
    """The batches to train on, in order. On-policy (`ahead` 0), batch k is generated when step k
    asks for it. Asynchronously, batches k+1..k+ahead are already being generated while step k
    trains, each from the weights the engines hold when it reaches them (see
    RolloutService.sync_weights), so its staleness at training time is known and bounded by `ahead`.
    A checkpoint keeps the batches already drawn from the sampler (`state`), so a resumed run
    trains on exactly what the uninterrupted one would have."""

    def __init__(self, engines: RolloutService, sampler: PromptSampler, ahead: int, last_step: int):
        self.engines, self.sampler, self.ahead, self.last_step = engines, sampler, ahead, last_step
        self.pending: deque = deque()  # (step, PendingGeneration or its finished Rollout)

    def next(self, step: int) -> tuple[Rollout, int]:
        """Batch `step` and its staleness (weight updates between its sampling and now)."""
        sent = self.pending[-1][0] if self.pending else step - 1
        for later in range(sent + 1, min(step + self.ahead, self.last_step) + 1):
            self.pending.append((later, self.engines.start_generation(self.sampler.next_batch(), later)))
        _, rollout = self.pending.popleft()
        rollout = self._finished(rollout)
        return rollout, self.engines.weight_version - rollout.version

    def _finished(self, item) -> Rollout:
        return item if isinstance(item, Rollout) else self.engines.finish_generation(item)

    def state(self) -> dict:
        """The sampler's position and the batches drawn before it (generation is awaited), their
        versions relative to the weights now."""
        self.pending = deque((step, self._finished(item)) for step, item in self.pending)
        now = self.engines.weight_version
        drawn = [(step, dataclasses.replace(r, version=r.version - now)) for step, r in self.pending]
        return {"sampler": self.sampler.state(), "drawn": drawn}

    def restore(self, state: dict) -> None:
        self.sampler.restore(state["sampler"])
        now = self.engines.weight_version
        self.pending = deque((step, dataclasses.replace(r, version=r.version + now))
                             for step, r in state["drawn"])


def prompts_per_round(cfg: DictConfig) -> int:
    """Prompts sampled per generation: trainer.prompts_per_step, times the over-sampling factor
    with dynamic sampling."""
    dynamic = cfg.algorithm.dynamic_sampling
    factor = dynamic.oversample if dynamic.enable else 1.0
    return math.ceil(cfg.trainer.prompts_per_step * factor)


Groups = list[tuple[int, int]]  # (round, group) pairs


def choose_groups(informative: list[list[bool]], need: int) -> tuple[Groups, Groups]:
    """Dynamic sampling's choice among the rounds' groups (`informative[r][g]`: whether group g of
    round r is): the first `need` informative ones as (round, group), and, if there are fewer, the
    first uninformative ones to fill the batch."""
    flags = [(r, g, ok) for r, of_round in enumerate(informative) for g, ok in enumerate(of_round)]
    kept = [(r, g) for r, g, ok in flags if ok][:need]
    return kept, [(r, g) for r, g, ok in flags if not ok][:need - len(kept)]


class DynamicSampling:
    """DAPO's dynamic sampling (algorithm.dynamic_sampling). A prompt group whose rewards are all
    equal (alg.informative_groups, on the reward sources' sum: the penalties only shape what the
    rewards teach) has nothing to teach a group estimator: it is dropped, and more rounds of prompts
    are sampled (with the same weights) and scored until the step has trainer.prompts_per_step
    informative groups, at most `max_extra_rounds` more. The first prompts_per_step informative
    groups train; the surplus is discarded."""

    def __init__(self, cfg: DictConfig, system: RLHFSystem, sampler: PromptSampler):
        self.cfg, self.system, self.sampler = cfg, system, sampler

    def fill(self, rollout: Rollout, step: int, timer: StageTimer) -> tuple[Rollout, dict[str, float]]:
        """The step's batch from its first, scored round `rollout`, and the metrics of the rounds."""
        n, need = self.cfg.rollout.n, self.cfg.trainer.prompts_per_step
        rounds = [rollout]
        informative = []  # per round, which of its groups are
        while True:
            last = rounds[-1].batch
            informative.append(alg.informative_groups(last["raw_scores"], last["valid"], n).tolist())
            found = sum(map(sum, informative))
            if found >= need or len(rounds) > self.cfg.algorithm.dynamic_sampling.max_extra_rounds:
                break
            with timer("generate"):
                more = self.system.rollout.generate(self.sampler.next_batch(), step, attempt=len(rounds))
            with timer("experience"):
                score_rollout(more, self.system.rewards(more), self.cfg)
            rounds.append(more)
        groups = sum(map(len, informative))
        if found == 0:
            saved = complete_checkpoints(Path(self.cfg.output_dir))
            raise RayRLHFError(f"step {step}: dynamic sampling found no prompt group whose rewards differ "
                               f"in {len(rounds)} rounds ({groups} groups of rollout.n={n}): the prompts "
                               "are all too easy or all too hard for the policy, or its samples all alike "
                               "(or the reward is constant); check them, or raise algorithm.dynamic_sampling"
                               ".max_extra_rounds or oversample" +
                               (f"; the last checkpoint is {saved[-1]}" if saved else ""))
        kept, top_up = choose_groups(informative, need)
        shortfall = len(top_up)

        def parts(chosen: Groups) -> list[Rollout]:
            return [rounds[r].groups([g for of_round, g in chosen if of_round == r], n)
                    for r in range(len(rounds))]

        merged = join_rollouts([p for p in parts(kept) + parts(top_up) if p.prompts],
                               self.system.rollout.pad_token_id)
        if shortfall:
            merged.batch["mask"][(need - shortfall) * n:] = 0.0
            tqdm.write(f"step {step}: dynamic sampling found {found} of trainer.prompts_per_step={need} "
                       f"informative prompt groups in {len(rounds)} rounds; {shortfall} uninformative "
                       "ones fill the batch, left out of the loss")
        valid = torch.cat([r.batch["valid"] for r in rounds]).bool()
        raw = torch.cat([r.batch["raw_scores"] for r in rounds])
        return merged, {"dynamic_sampling/rounds": float(len(rounds)),
                        "dynamic_sampling/groups_dropped": float(groups - found),
                        "dynamic_sampling/groups_surplus": float(max(0, found - need)),
                        "dynamic_sampling/shortfall": float(shortfall),
                        "dynamic_sampling/reward_mean_all": raw[valid].mean().item()}


def roles_lost(err: ray.exceptions.RayActorError | NodeLost, system: RLHFSystem | None, output_dir: Path
               ) -> RayRLHFError:
    """A role that cannot be restarted in place (a trainer rank, a scorer, engines whose lost node
    left no room elsewhere) died: the run stops, naming it (and the node, if one was lost) and the
    checkpoint to resume from."""
    saved = complete_checkpoints(output_dir)
    hint = (f"resume from {saved[-1]} with resume=true" if saved else
            "no checkpoint had been written (trainer.checkpoint_every)")
    lost = system.lost_nodes() if system is not None else {}
    if lost:
        nodes = "; ".join(f"node {node_label(node)} was lost (its raylet stopped) with {', '.join(roles)}"
                          for node, roles in lost.items())
        why = f" and no node had room for them within {err.waited_s:.0f} s (ray.node_loss_timeout_s)" \
            if isinstance(err, NodeLost) else ""
        return RayRLHFError(f"{nodes}{why}; the run stopped and its other actors were released; {hint}")
    if isinstance(err, NodeLost):
        return RayRLHFError(f"{err}; the run stopped and its actors were released; {hint}")
    who = system.describe_actor(err.actor_id) if system is not None and err.actor_id else "an actor"
    return RayRLHFError(f"{who} died ({type(err).__name__}: its process exited or was killed, e.g. "
                        f"out of memory); the run stopped and its actors were released; {hint}")


ROLLOUTS_FILE = "rollouts.pt"


def save_checkpoint(system: RLHFSystem, cfg: DictConfig, step: int, kl_ctl, rollouts: RolloutQueue) -> Path:
    output_dir = Path(cfg.output_dir)
    path = checkpoint_dir(output_dir, step)
    system.save_checkpoint(str(path))
    torch.save(rollouts.state(), path / ROLLOUTS_FILE)
    write_state(path, {"step": step, "kl_coef": kl_ctl.coef}, cfg, PPO_RESUME_KEYS)
    prune(output_dir, cfg.trainer.keep_checkpoints)
    return path


def resume(system: RLHFSystem, path: Path, state: dict, kl_ctl, rollouts: RolloutQueue) -> int:
    """Restores trainers (and the engines' weights), KL controller, data position and the batches
    drawn before it; returns the first step to run."""
    system.load_checkpoint(str(path))
    kl_ctl.coef = state["kl_coef"]
    rollouts.restore(torch.load(path / ROLLOUTS_FILE, weights_only=False))
    tqdm.write(f"resumed from {path} after step {state['step']}")
    return state["step"] + 1


def score_rollout(rollout: Rollout, rewards: dict, cfg: DictConfig) -> None:
    """Checks the reward workers' output, then puts into the batch `valid`, `raw_scores` (the sum of
    the reward sources: what dynamic sampling compares) and `penalised_scores` (with
    reward.truncated_penalty and the overlong penalty: what the estimator gets once normalised and
    clipped), and the sources' own metrics into the rollout.

    An unusable reward stops the run naming the sample, unless reward.skip_invalid, which drops
    the sample from training (its mask becomes 0) and counts it.
    """
    reward_cfg = cfg.reward
    scores, reasons, batch = rewards["scores"], rewards["reasons"], rollout.batch
    if "env_scores" in batch.tensors:  # the environment's summed step rewards: one more source
        scores = scores + batch["env_scores"]
        # Trajectories the environment failed on are dropped whatever their reward.
        reasons = {row: why for row, why in reasons.items() if row not in rollout.env_errors}
    if reasons and (not reward_cfg.skip_invalid or len(reasons) == len(scores)):
        row = min(reasons)
        hint = "every sample of the batch failed" if reward_cfg.skip_invalid else \
            "set reward.skip_invalid=true to drop such samples"
        raise RewardError(f"reward for sample {row} is unusable: {reasons[row]} ({len(reasons)} such in "
                          f"the batch; {hint}); prompt {str(rollout.prompts[row])[:80]!r}, "
                          f"response {rollout.responses[row][:80]!r}")
    valid = torch.isfinite(scores)
    if rollout.env_errors:  # rollout.env_errors=skip: trajectories dropped, and counted
        valid &= batch["env_failed"] == 0
        row, why = min(rollout.env_errors.items())
        summary = f"on {len(rollout.env_errors)} of {len(valid)} trajectories (the first, sample {row}: " \
                  f"{why})"
        if not valid.any():
            raise EnvironmentFailure(f"the environment failed on every trajectory of the batch {summary}")
        tqdm.write(f"the environment failed {summary}; dropped (rollout.env_errors=skip)")
    raw = scores.nan_to_num(0.0)
    batch["valid"], batch["raw_scores"] = valid.float(), raw
    batch["mask"] = batch["mask"] * batch["valid"][:, None]
    overlong = alg.overlong_penalty(batch["response_lengths"], response_budget(cfg.rollout),
                                    reward_cfg.overlong_buffer, reward_cfg.overlong_penalty)
    batch["penalised_scores"] = raw + reward_cfg.truncated_penalty * batch["truncated"] + overlong
    rollout.reward_metrics = rewards["metrics"]
    if reward_cfg.overlong_buffer:
        rollout.reward_metrics = {**rollout.reward_metrics, "overlong_penalty": overlong}


def shape_rewards(rollout: Rollout, reward_cfg, like: Rollout | None = None) -> dict[str, float]:
    """The scored rollout's `scores` (its penalised scores normalised and clipped as configured) and
    its reward metrics. `like` is the rollout whose statistics reward.normalize uses (ReMax's greedy
    baseline is scaled as the samples are)."""
    batch = rollout.batch
    valid = batch["valid"].bool()
    reference = None if like is None else (like.batch["penalised_scores"], like.batch["valid"])
    batch["scores"] = alg.shape_scores(batch["penalised_scores"], valid, reward_cfg.normalize,
                                       reward_cfg.clip or None, like=reference)
    raw = batch["raw_scores"]
    failed = batch.tensors.get("env_failed", torch.zeros(len(valid))).bool()
    metrics = {"reward/mean": raw[valid].mean().item(),
               "reward/std": raw[valid].std().item() if valid.sum() > 1 else 0.0,
               "reward/invalid": float((~valid & ~failed).sum())}
    for key, values in rollout.reward_metrics.items():
        metrics[f"reward/{key}"] = values[valid].nanmean().item()
    return metrics | environment_metrics(rollout, "rollout")


def environment_metrics(rollout: Rollout, prefix: str) -> dict[str, float]:
    """With rollout.env: the trajectories' mean turns (<prefix>/turns_mean), seconds in environment
    steps, the environment's own metrics (e.g. tool_calls), and the failures dropped."""
    if "env_failed" not in rollout.batch.tensors:
        return {}
    metrics = {f"{prefix}/env_failures": rollout.batch["env_failed"].sum().item()}
    for key, values in rollout.env_metrics.items():
        name = "turns_mean" if key == "turns" else key
        metrics[f"{prefix}/{name}"] = torch.tensor(values).nanmean().item()
    return metrics


def sample_records(step: int, rollout: Rollout, count: int) -> list[dict]:
    """The first `count` samples of a scored rollout, as samples.jsonl records."""
    batch = rollout.batch
    return [{"step": step, "prompt": rollout.prompts[i], "response": rollout.responses[i],
             "reward": batch["raw_scores"][i].item(), "valid": bool(batch["valid"][i]),
             "truncated": bool(batch["truncated"][i]), "response_tokens": int(batch["response_lengths"][i])}
            for i in range(min(count, len(rollout.responses)))]


def needs_old_logprob_pass(cfg: DictConfig) -> bool:
    """Whether pi_old's log-probs need a forward pass of their own before training. With one
    optimizer step per batch, pi_old is the policy being trained, so the training forward gives
    them (detached: ratio 1, the same gradient); only a KL penalty in the reward, or more steps
    per batch, needs them earlier."""
    algo = cfg.algorithm
    one_step = algo.ppo_epochs == 1 and algo.train_batch_size == cfg.trainer.prompts_per_step * cfg.rollout.n
    kl_in_reward = algo.kl_in == "reward" and algo.kl_coef > 0
    return algo.recompute_old_logprobs or not one_step or kl_in_reward


def add_advantages(batch: Batch, algo, kl_coef: float, group_size: int,
                   greedy_scores: torch.Tensor | None = None) -> dict[str, float]:
    """Per-token rewards (KL penalty and the estimator's outcome signal), then advantages and
    returns: GAE with the critic, or discounted returns for the critic-free estimators."""
    if algo.mask_truncated:  # DAPO's overlong filtering: they count in their groups, but train nothing
        batch["mask"] = batch["mask"] * (1 - batch["truncated"])[:, None]
    mask = batch["mask"]
    outcome = alg.outcome_scores(batch["scores"], algo.estimator, group_size, batch["valid"],
                                 greedy_scores)
    stats = {"kl/coef": kl_coef}
    kl = torch.zeros_like(mask)
    if algo.kl_in == "reward" and "ref_logprobs" in batch.tensors:
        kl = alg.kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], algo.kl_estimator) * mask
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


def kl_metrics(batch: Batch) -> dict[str, float]:
    """kl/mean: the k1 KL of pi_old to the reference summed over each response, averaged over
    the valid samples (what the adaptive KL controller tracks); none without a reference."""
    if "ref_logprobs" not in batch.tensors:
        return {}
    k1 = alg.kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], "k1") * batch["mask"]
    valid = batch["valid"]
    return {"kl/mean": (k1.sum(dim=1) * valid).sum().item() / max(valid.sum().item(), 1)}


class Evaluator:
    """Held-out prompts through the current policy, scored by the reward sources and, if given,
    by eval.function (eval/rule_score, e.g. a task's accuracy). Nothing trains on them."""

    def __init__(self, cfg: DictConfig, tokenizer):
        self.cfg = cfg.eval
        self.prompts = held_out_prompts(cfg, tokenizer)
        self.rule = load_reward_function(cfg.eval.function) if cfg.eval.function else None

    def __call__(self, system: RLHFSystem, step: int) -> dict[str, float]:
        rollout = system.rollout.generate(self.prompts, step, greedy=self.cfg.greedy)
        rewards = system.rewards(rollout)
        scores = rewards["scores"] + rollout.batch.tensors.get("env_scores", 0.0)
        valid = torch.isfinite(scores) & (rollout.batch.tensors.get("env_failed", 0.0) == 0)
        mean = scores[valid].mean().item() if valid.any() else float("nan")
        metrics = {"eval/reward_mean": mean,
                   "eval/invalid": float((~valid).sum()),
                   "eval/response_length_mean": rollout.batch["response_lengths"].float().mean().item(),
                   **environment_metrics(rollout, "eval")}
        for key, values in rewards["metrics"].items():
            metrics[f"eval/{key}"] = values[valid].nanmean().item()
        if self.rule is not None:
            metrics |= rule_scores(self.rule, rollout.prompts, rollout.responses, rollout.fields)
        return metrics


def step_metrics(step: int, batch: Batch, feedback: dict, learn: dict, sync_bytes: int,
                 timer: StageTimer, sync_cfg, staleness: int) -> dict[str, float]:
    metrics = {"step": step, **feedback, **learn, **timer.metrics(),
               "response/length_mean": batch["response_lengths"].float().mean().item(),
               "response/truncated_frac": batch["truncated"].mean().item(),
               "batch/tokens": batch["attention_mask"].sum().item(),
               "sync/bytes": sync_bytes}
    metrics["sync/gb_per_s"] = sync_bytes / 1e9 / max(metrics["time/weight_sync"], 1e-9)
    metrics["throughput/tokens_per_s"] = batch["mask"].sum().item() / metrics["time/step"]
    metrics["rollout/staleness"] = staleness
    # Only an on-policy batch should match the trainer: a stale one was sampled by older weights.
    if sync_cfg.check_every and step % sync_cfg.check_every == 0 and staleness == 0:
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
    functions = [cfg.reward.function, *(spec.function for spec in cfg.reward.functions), cfg.eval.function]
    for name in filter(None, functions):
        load_reward_function(name)  # fails here, before any actor starts
    if cfg.rollout.env:
        environment_class(cfg.rollout)  # fails here too
    if cfg.model.build_tiny:
        ensure_tiny_model(cfg.model, cfg.seed)
    checks = {f"reward.models[{i}].path": spec.path for i, spec in enumerate(cfg.reward.models)}
    checks |= {"critic.model_path": cfg.critic.model_path, "model.tokenizer": cfg.model.tokenizer,
               "model.path": cfg.model.path}
    for key, path in checks.items():
        if path:
            check_model_path(key, path, tokenizer=key == "model.tokenizer")
    return load_tokenizer(cfg.model.tokenizer or cfg.model.path)


def save_policy(system: RLHFSystem, tokenizer, path: Path) -> None:
    system.save_policy(str(path))
    tokenizer.save_pretrained(path)

