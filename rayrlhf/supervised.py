"""The SFT and reward-model stages: data-parallel DeepSpeed ranks (the same trainer actors as PPO)
fed batches of demonstrations or preference pairs by this driver.

    for each optimizer step: a batch -> split over the ranks -> train_step (all-reduce, step)
    every eval_every steps and at the end: held-out loss (SFT) or pairwise accuracy (RM)
    every checkpoint_every steps (and on SIGTERM/SIGINT): a checkpoint resume=true continues from
    save the model in HF format: <output_dir>/model
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import ray
from omegaconf import DictConfig, OmegaConf

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
from rayrlhf.metrics import MetricsLog, StageTimer
from rayrlhf.modeling import check_model_path, load_tokenizer
from rayrlhf.system import trainer_group
from rayrlhf.tiny import ensure_tiny_model

PROGRESS = {"sft": {"loss": "loss/sft", "eval_loss": "eval/loss"},
            "rm": {"loss": "loss/rm", "acc": "rm/accuracy", "eval_acc": "eval/accuracy"}}


def train_supervised(stage: str, cfg: DictConfig) -> dict[str, float]:
    """Runs `stage` ("sft" or "rm") as configured; writes the model and summary.json into
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
    try:
        group = trainer_group(stage, stage_cfg, model_path, stage_cfg.batch_size, cfg,
                              total_steps=batches.total_steps)
        ranks = len(group.actors)
        if resume_from is not None:
            wait(group.call("load_checkpoint", str(resume_from / stage)), f"{stage} checkpoint load",
                 timeout_s)
            print(f"resumed from {resume_from} after step {first_step - 1}", flush=True)
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
    finally:
        stop.restore()
        if log is not None:
            log.close()
        if group is not None:
            group.shutdown()
        if started_ray:
            ray.shutdown()
    summary = {"steps": batches.total_steps, **{f"data/{k}": v for k, v in data.counts.items()},
               **{k: v for k, v in metrics.items() if k.startswith(("eval/", "loss/", "rm/"))}}
    if stage == "rm":
        summary["rm/accuracy"] = metrics["eval/accuracy"]
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class Batches:
    """Shuffled passes over the examples (packed into rows for SFT if asked), `batch_size` rows a
    step; the last partial batch of a pass is left out, as every step has the same size."""

    def __init__(self, stage: str, data: SupervisedData, stage_cfg, pad_id: int, seed: int):
        self.stage, self.pad_id, self.seed = stage, pad_id, seed
        self.batch_size, self.epochs = stage_cfg.batch_size, stage_cfg.epochs
        if stage == "sft":
            packed = stage_cfg.packing
            self.rows = pack(data.train, stage_cfg.data.max_tokens) if packed else [[e] for e in data.train]
            self.held_out = sft_batch([[e] for e in data.eval], pad_id)
        else:
            self.rows = data.train
            self.held_out = preference_batch(data.eval, pad_id)
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
                rows = [self.rows[i] for i in order[start:start + self.batch_size]]
                make = sft_batch if self.stage == "sft" else preference_batch
                yield make(rows, self.pad_id)
                step += 1


def held_out_metrics(stage: str, group, batch, timeout_s: float) -> dict[str, float]:
    """Held-out loss (SFT, per response token) or pairwise accuracy and loss (RM), over all ranks."""
    parts = wait(group.scatter("evaluate", [(b,) for b in batch.chunks(len(group.actors))]),
                 f"{stage} evaluation", timeout_s)
    sums = {k: sum(p.get(k, 0.0) for p in parts) for k in set().union(*parts)}
    if stage == "sft":
        return {"eval/loss": sums["nll"] / max(sums["tokens"], 1)}
    return {"eval/accuracy": sums["correct"] / sums["pairs"], "eval/loss": sums["loss"] / sums["pairs"]}
