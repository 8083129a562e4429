"""The supervised stages, SFT, reward modelling and DPO: data-parallel DeepSpeed ranks (the same
trainer actors as PPO) fed batches of demonstrations or preference pairs by this driver.

    DPO only, once: the ranks' log-probs of every pair, before any step (the reference's)
    for each optimizer step: a batch -> split over the ranks -> train_step (all-reduce, step)
    every eval_every steps and at the end: held-out loss (SFT), pairwise accuracy (RM, DPO)
    every checkpoint_every steps (and on SIGTERM/SIGINT): a checkpoint resume=true continues from
    save the model in HF format: <output_dir>/model
    DPO with eval.function: the task accuracy of the starting and the trained policy

DPO's reference is the policy it starts from, so the ranks hold its exact weights before their
first step: they score every pair once then, with no second copy of the model in memory and no
reference actors, whatever the ZeRO stage or LoRA (whose update starts at zero); a checkpoint keeps
the scores, as the weights are no longer the reference's after it. SimPO needs none.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rayrlhf.batch import Batch
from rayrlhf.checkpoint import (
    GracefulStop,
    check_resumable,
    checkpoint_dir,
    prune,
    resolve_resume,
    supervised_resume_keys,
    write_state,
)
from rayrlhf.cluster import role_memory, start_ray, wait
from rayrlhf.data import SupervisedData, load_supervised, pack, preference_batch, sft_batch
from rayrlhf.errors import DataError, Interrupted
from rayrlhf.evaluation import policy_task_score
from rayrlhf.metrics import MetricsLog, StageTimer
from rayrlhf.modeling import check_model_path, load_tokenizer
from rayrlhf.objectives import OBJECTIVES
from rayrlhf.rollout_service import split_evenly
from rayrlhf.system import trainer_group
from rayrlhf.tiny import ensure_tiny_model

PROGRESS = {"sft": {"loss": "loss/sft", "eval_loss": "eval/loss"},
            "rm": {"loss": "loss/rm", "acc": "rm/accuracy", "eval_acc": "eval/accuracy"},
            "dpo": {"loss": "loss/dpo", "acc": "dpo/accuracy", "eval_acc": "eval/accuracy"}}
REFERENCE_FILE = "reference_logps.pt"


def train_supervised(stage: str, cfg: DictConfig) -> dict[str, float]:
    """Runs `stage` ("sft", "rm" or "dpo") as configured; writes the model and summary.json into
    output_dir and returns the summary."""
    stage_cfg, output_dir = cfg[stage], Path(cfg.output_dir)
    model_path = stage_cfg.model_path or cfg.model.path
    if cfg.model.build_tiny and model_path == cfg.model.path:
        ensure_tiny_model(cfg.model, cfg.seed)
    check_model_path(f"{stage}.model_path" if stage_cfg.model_path else "model.path", model_path)
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path)
    data = load_supervised(stage, stage_cfg.data, cfg.data.task, tokenizer, cfg.seed)
    print(f"{stage} data: {data.describe()}", flush=True)
    batches = Batches(stage, data, stage_cfg, tokenizer.pad_token_id, cfg.seed)
    resume_from = resolve_resume(cfg.resume, output_dir)
    keys = supervised_resume_keys(stage)
    first_step = 1 if resume_from is None else check_resumable(resume_from, cfg, keys)["step"] + 1
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    started_ray = start_ray(cfg.ray)
    group, log = None, None
    timeout_s = cfg.ray.call_timeout_s
    stop = GracefulStop()
    task_scores = {}
    try:
        group = trainer_group(stage, stage_cfg, model_path, stage_cfg.batch_size, cfg,
                              total_steps=batches.total_steps)
        ranks = len(group.actors)
        if resume_from is not None:
            wait(group.call("load_checkpoint", str(resume_from / stage)), f"{stage} checkpoint load",
                 timeout_s)
            print(f"resumed from {resume_from} after step {first_step - 1}", flush=True)
        if batches.needs_reference:
            batches.reference = torch.load(resume_from / REFERENCE_FILE) if resume_from is not None else \
                reference_logps(group, data, tokenizer.pad_token_id, stage_cfg.batch_size, timeout_s)
        log = MetricsLog(output_dir, batches.total_steps, first_step, name=stage, progress=PROGRESS[stage],
                         logging_cfg=cfg.logging, config=OmegaConf.to_container(cfg, resolve=True))
        metrics: dict[str, float] = {}
        for step, batch in enumerate(batches, 1):
            if step < first_step:  # trained on before the checkpoint
                continue
            timer = StageTimer()
            with timer("train"):
                per_rank = wait(group.scatter("train_step", [(b,) for b in batch.chunks(ranks)]),
                                f"{stage} training", timeout_s)
            metrics = {"step": step, **{k: sum(r[k] for r in per_rank) / ranks for k in per_rank[0]}}
            if step == batches.total_steps or (stage_cfg.eval_every and step % stage_cfg.eval_every == 0):
                with timer("eval"):
                    metrics |= held_out_metrics(stage, group, batches.held_out, timeout_s)
            metrics |= {"time/train": timer.seconds["train"], "time/step": timer.metrics()["time/step"],
                        "throughput/samples_per_s": len(batch) / timer.seconds["train"],
                        **role_memory([group], timeout_s)}
            log.log(metrics)
            every = stage_cfg.checkpoint_every
            if (every and step % every == 0) or stop.signum:
                path = checkpoint_dir(output_dir, step)
                wait(group.call("save_checkpoint", str(path / stage)), f"{stage} checkpoint save", timeout_s)
                if batches.reference is not None:
                    torch.save(batches.reference, path / REFERENCE_FILE)
                write_state(path, {"step": step}, cfg, keys)
                prune(output_dir, stage_cfg.keep_checkpoints)
                if stop.signum:
                    raise Interrupted(f"stopped by signal {stop.signum} after step {step}; checkpoint in "
                                      f"{path}; to continue, run the same command with resume=true",
                                      stop.signum)
        if not metrics:  # resumed after the last step
            metrics = {"step": batches.total_steps,
                       **held_out_metrics(stage, group, batches.held_out, timeout_s)}
        wait(group.call("save", str(output_dir / "model")), f"{stage} save", timeout_s)
        tokenizer.save_pretrained(output_dir / "model")
        log.close()
        group.shutdown()  # the evaluation's engines may want the trainers' devices
        log = group = None
        if stage == "dpo" and cfg.eval.function:  # the task accuracy before and after, as PPO reports it
            print(f"dpo: the task accuracy ({cfg.eval.function}) of the starting and the trained policy",
                  flush=True)
            task_scores = {f"accuracy/{when}": policy_task_score(cfg, path, tokenizer)
                           for when, path in (("start", model_path), ("end", str(output_dir / "model")))}
            print(f"dpo: {task_scores}", flush=True)
    finally:
        stop.restore()
        if log is not None:
            log.close()
        if group is not None:
            group.shutdown()
        if started_ray:
            ray.shutdown()
    summary = {"steps": batches.total_steps, **{f"data/{k}": v for k, v in data.counts.items()},
               **{k: v for k, v in metrics.items() if k.startswith(("eval/", "loss/", "rm/", "dpo/"))},
               **task_scores}
    if stage == "rm":
        summary["rm/accuracy"] = metrics["eval/accuracy"]
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class Batches:
    """Shuffled passes over the examples (packed into rows for SFT if asked), `batch_size` rows a
    step; the last partial batch of a pass is left out, as every step has the same size. DPO's
    batches carry the reference's log-probs of their pairs (`ref_logps`) once `reference` is set."""

    def __init__(self, stage: str, data: SupervisedData, stage_cfg, pad_id: int, seed: int):
        self.stage, self.pad_id, self.seed = stage, pad_id, seed
        self.batch_size, self.epochs = stage_cfg.batch_size, stage_cfg.epochs
        if stage == "sft":
            packed = stage_cfg.packing
            self.rows = pack(data.train, stage_cfg.data.max_tokens) if packed else [[e] for e in data.train]
            self.held_out_rows = [[e] for e in data.eval]
        else:
            self.rows, self.held_out_rows = data.train, data.eval
        self.needs_reference = stage == "dpo" and OBJECTIVES["dpo"].of(stage_cfg).needs_reference
        # DPO: the reference's summed log-probs [pairs, 2] of the training ("train") and held-out
        # ("eval") pairs, in data order.
        self.reference: dict[str, torch.Tensor] | None = None
        if len(data.eval) < stage_cfg.num_ranks:
            raise DataError(f"{stage} data has {len(data.eval)} held-out examples, fewer than "
                            f"{stage}.num_ranks={stage_cfg.num_ranks} (each rank evaluates a share)")
        per_epoch = len(self.rows) // self.batch_size
        if per_epoch == 0:
            raise DataError(f"{stage} data has {len(self.rows)} training rows, fewer than "
                            f"{stage}.batch_size={self.batch_size}")
        self.total_steps = per_epoch * self.epochs
        if stage_cfg.max_steps:
            self.total_steps = min(self.total_steps, stage_cfg.max_steps)

    def __iter__(self):
        step = 0
        for epoch in range(self.epochs):
            order = list(range(len(self.rows)))
            random.Random(self.seed * 1000 + epoch).shuffle(order)
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                if step == self.total_steps:
                    return
                yield self._batch(self.rows, "train", order[start:start + self.batch_size])
                step += 1

    @property
    def held_out(self) -> Batch:
        return self._batch(self.held_out_rows, "eval", list(range(len(self.held_out_rows))))

    def _batch(self, rows: list, part: str, index: list[int]) -> Batch:
        make = sft_batch if self.stage == "sft" else preference_batch
        batch = make([rows[i] for i in index], self.pad_id)
        if self.reference is not None:
            batch["ref_logps"] = self.reference[part][index]
        return batch


def reference_logps(group, data: SupervisedData, pad_id: int, batch_size: int, timeout_s: float
                    ) -> dict[str, torch.Tensor]:
    """DPO's reference log-probs: the summed log-probs [pairs, 2] of every training and held-out
    pair under the ranks' weights before their first step (the starting policy's), in chunks of
    up to 16 batches spread over the ranks."""
    ranks, started = len(group.actors), time.perf_counter()
    parts = {"train": data.train, "eval": data.eval}
    chunks = [(part, rows) for part, examples in parts.items()
              for rows in split_evenly(examples, math.ceil(len(examples) / (16 * batch_size)))]
    out: dict[str, list[torch.Tensor]] = {part: [] for part in parts}
    for part, rows in tqdm(chunks, desc="dpo reference log-probs", unit="chunk", dynamic_ncols=True):
        batch = preference_batch(rows, pad_id)
        out[part] += wait(group.scatter("infer", [(b,) for b in batch.chunks(ranks)]),
                          "dpo reference log-probs", timeout_s)
    print(f"dpo: the reference's log-probs of {len(data.train)} training and {len(data.eval)} held-out "
          f"pairs in {time.perf_counter() - started:.1f} s", flush=True)
    return {part: torch.cat(values) for part, values in out.items()}


def held_out_metrics(stage: str, group, batch, timeout_s: float) -> dict[str, float]:
    """The stage's held-out metrics (objective.held_out_metrics), over all ranks."""
    parts = wait(group.scatter("evaluate", [(b,) for b in batch.chunks(len(group.actors))]),
                 f"{stage} evaluation", timeout_s)
    return OBJECTIVES[stage].held_out_metrics({k: sum(p.get(k, 0.0) for p in parts)
                                               for k in set().union(*parts)})
