"""The trainer worker: one data-parallel DeepSpeed ZeRO rank of the actor or the critic."""

from __future__ import annotations

import math
import os
import socket
from collections import defaultdict

import torch

from rayrlhf import weight_sync
from rayrlhf.adapters import (
    SOFT_PROMPT_DIR,
    adalora_state,
    apply_peft,
    dense_spec,
    hf_weights,
    load_adalora_state,
    orthogonality_penalty,
    plain_model,
    quantization,
    reallocate_ranks,
    save_plain,
)
from rayrlhf.algorithms import Sampling
from rayrlhf.batch import (
    Batch,
    row_micro_batches,
    row_tokens,
    shuffled_rows,
    token_micro_batches,
)
from rayrlhf.checkpoint import load_rng_states, save_rng_states
from rayrlhf.cpu_platform import onednn_chosen, use_onednn_linear
from rayrlhf.modeling import DTYPES, default_device, load_causal_lm, load_scalar_model, to_device
from rayrlhf.objectives import OBJECTIVES
from rayrlhf.validation import SOFT_PROMPT_PEFT
from rayrlhf.weight_channel import SendingRank


def node_address() -> tuple[str, int]:
    """This node's IP and a free TCP port on it (for a rendezvous hosted here)."""
    import ray

    return ray.util.get_node_ip_address(), free_port()


def free_port(host: str = "") -> int:
    """A TCP port nothing listens on at `host` (all interfaces by default) at the time of asking."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def deepspeed_config(role_cfg, train_batch_size: int, world_size: int, dtype: str) -> dict:
    return {
        "train_batch_size": train_batch_size,
        "train_micro_batch_size_per_gpu": role_cfg.micro_batch_size,
        "gradient_accumulation_steps": train_batch_size // (world_size * role_cfg.micro_batch_size),
        "gradient_clipping": role_cfg.grad_clip,
        # The trainer owns the boundary (one step() per minibatch), so micro-batches may vary in
        # number and size; it scales each micro-batch's loss by its share itself.
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": role_cfg.zero_stage},
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": role_cfg.lr, "weight_decay": role_cfg.weight_decay, "betas": [0.9, 0.95],
            # torch's fused AdamW runs on CPU and GPU alike (DeepSpeed's own kernels need a CUDA
            # build); on CPU it is about 3x faster than the default multi-tensor one.
            "torch_adam": True, "adam_w_mode": True, "fused": True}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class TrainerWorker(SendingRank):
    """`role` names what the rank optimises (rayrlhf.objectives.OBJECTIVES): "actor", "critic",
    "sft", "rm" or "dpo". An actor rank is also an end of the weight-sync channel (SendingRank)."""

    def __init__(self, role: str, rank: int, world_size: int):
        self.role, self.rank, self.world_size = role, rank, world_size
        super().__init__()

    def address(self) -> tuple[str, int]:
        return node_address()

    def setup(self, master_addr: str, master_port: int, model_path: str, role_cfg, train_batch_size: int,
              model_cfg, seed: int, total_steps: int = 1, algo_cfg=None, sampling: Sampling = Sampling(),
              norm_len: int = 1) -> None:
        """`train_batch_size` samples make one optimizer step over all ranks, of `total_steps` in
        the run (the learning-rate schedule's length); `model_cfg` gives the dtype and the linear
        layers' backend; `algo_cfg`, `sampling` (the engines' sampling distribution, see
        algorithms.Sampling) and `norm_len` (the PPO loss settings) matter to the actor and critic."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        import deepspeed

        self.device = default_device()
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=self.backend)
        torch.manual_seed(seed)
        self.cfg, self.algo = role_cfg, algo_cfg
        self.objective = OBJECTIVES[self.role].of(role_cfg, algo_cfg, sampling, norm_len)
        dtype = model_cfg.dtype
        ds_config = deepspeed_config(role_cfg, train_batch_size, self.world_size, dtype)
        if role_cfg.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # Kept alive so from_pretrained loads straight into ZeRO-3 partitions.
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        scalar_head = not self.objective.causal_lm
        model = (load_scalar_model if scalar_head else load_causal_lm)(
            model_path, dtype, quantization(role_cfg.peft, DTYPES[dtype]))
        if role_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if role_cfg.peft.method != "none":
            model = apply_peft(model, role_cfg.peft, scalar_head, total_steps)
            if role_cfg.gradient_checkpointing:
                model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
        if onednn_chosen(model_cfg.linear_backend):
            use_onednn_linear(model)
        if role_cfg.compile:
            # The backbone, which every role's forward calls (the scalar heads bypass the top
            # module); torch compiles it at its first forward and backward.
            plain_model(model).base_model.compile(dynamic=True)
        trained = [p for p in model.parameters() if p.requires_grad]
        if self.rank == 0:
            print(f"{self.role}: peft.method={role_cfg.peft.method} trains {_count(trained):,} of "
                  f"{_count(model.parameters()):,} parameters", flush=True)

        def schedule(optimizer):  # DeepSpeed steps it after each optimizer step and checkpoints it
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda taken: lr_factor(
                taken + 1, role_cfg.lr_schedule, role_cfg.warmup_steps, total_steps, role_cfg.min_lr_ratio))

        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=trained, config=ds_config,
                                               lr_scheduler=schedule)
        if role_cfg.peft.method == "adalora":  # between the optimizer step and the gradients' zeroing
            self.engine.optimizer.register_step_post_hook(
                lambda *_: reallocate_ranks(self.module, self.engine.global_steps))
        if self.world_size == 1 and role_cfg.zero_stage == 0:
            # One rank has nothing to all-reduce, but DeepSpeed would still copy every gradient
            # through a buffer at each step.
            self.engine.enable_backward_allreduce = False
        self.dtype = DTYPES[dtype]
        if role_cfg.compile:  # during set-up, beside the engines' own start-up, not in the first step
            self.objective.compile_ahead(self.module, self.device)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @torch.no_grad()
    def infer(self, batch: Batch) -> torch.Tensor:
        """Old log-probs (actor), old values (critic) or the pairs' summed log-probs (DPO's
        reference pass) of this rank's share of the batch."""
        self.module.eval()
        micro_batches = self._micro_batches(batch)
        outputs = self._forwards([micro for _, micro in micro_batches], lambda micro: self.objective.infer(
            self.module, to_device(micro, self.device)).cpu())
        out = outputs[0].new_empty(len(batch), *outputs[0].shape[1:])
        for (rows, _), output in zip(micro_batches, outputs, strict=True):
            out[rows] = output
        return out

    @torch.no_grad()
    def base_logprobs(self, batch: Batch) -> torch.Tensor:
        """The log-probs of the actor's frozen base, its adapters off: the reference of
        reference.from_actor_base."""
        with self.module.disable_adapter():
            return self.infer(batch)

    def _forwards(self, micro_batches: list[Batch], forward) -> list:
        """forward(micro) of each micro-batch, with as many forwards on every rank (under ZeRO-3
        each gathers the weights collectively): shares that differ by a row may differ by a
        micro-batch, so the ranks with fewer run their first row again, uncounted."""
        count = torch.tensor([len(micro_batches)], device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        outputs = [forward(micro) for micro in micro_batches]
        for _ in range(int(count) - len(micro_batches)):
            forward(micro_batches[0].select(slice(0, 1)))
        return outputs

    def _micro_batches(self, batch: Batch) -> list[tuple[torch.Tensor, Batch]]:
        """micro_batch_size rows at a time, or, with micro_batch_tokens, about that many real tokens
        a micro-batch, as many on every rank (ZeRO-3 gathers weights collectively in every forward)."""
        if not self.cfg.micro_batch_tokens:
            return row_micro_batches(batch, self.cfg.micro_batch_size)
        count = torch.tensor([-(-int(row_tokens(batch).sum()) // self.cfg.micro_batch_tokens)],
                             device=self.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return token_micro_batches(batch, int(count), self.objective.keeps_prompt_groups)

    def train(self, batch: Batch, seed: int, kl_coef: float) -> tuple[dict[str, float], torch.Tensor | None]:
        """PPO epochs over this rank's share: minibatches of train_batch_size / ranks, each
        accumulated over micro-batches; DeepSpeed all-reduces and steps at each minibatch end.

        Returns the mean stats and, for an actor batch without old_logprobs (one optimizer step
        per batch), the log-probs its training forward found, in the batch's row order."""
        per_rank = self.algo.train_batch_size // self.world_size
        objective = self.objective
        from_forward = objective.old_from_forward(batch)
        if from_forward and (self.algo.ppo_epochs > 1 or per_rank < len(batch)):
            raise ValueError("a batch without old_logprobs must get exactly one optimizer step")
        generator = torch.Generator().manual_seed(seed)
        sums: dict[str, float] = defaultdict(float)
        for _ in range(self.algo.ppo_epochs):
            order = shuffled_rows(batch, generator, objective.keeps_prompt_groups)
            for minibatch in batch.select(order).minibatches(per_rank):
                rows = self._optimizer_step(minibatch, sums, kl_coef=kl_coef)
        if not from_forward:
            return self._means(sums), None
        old_logprobs = torch.empty_like(batch["engine_logprobs"])
        old_logprobs[order[torch.cat(rows)]] = torch.cat(objective.take_forward_logprobs())
        return self._means(sums), old_logprobs

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on this rank's share of a batch (SFT, reward model, DPO)."""
        sums: dict[str, float] = defaultdict(float)
        self._optimizer_step(batch, sums)
        return self._means(sums)

    def _means(self, sums: dict[str, float]) -> dict[str, float]:
        """The stats' means over the micro-batches, and the learning rate of the last step."""
        count = sums.pop("_count")
        return {**{key: value / count for key, value in sums.items()}, f"lr/{self.role}": self.last_lr}

    def _optimizer_step(self, minibatch: Batch, sums: dict[str, float], **loss_kwargs) -> list[torch.Tensor]:
        """One optimizer step over this rank's share of a minibatch, in micro-batches; returns their
        row indices.

        Each micro-batch's loss (a mean over its loss units: tokens for the token-mean losses, else
        valid rows) counts by its share of the units of the whole minibatch, over every rank, times
        the ranks (DeepSpeed averages the ranks' gradients). So the step follows the minibatch's
        loss however it is cut into micro-batches and shared among ranks: a token weighs the same
        on a rank of short responses as on one of long responses."""
        self.module.train()
        micro_batches = self._micro_batches(minibatch)
        units = self.objective.units(minibatch)
        total = units.sum()
        if self.world_size > 1:
            total = total.to(self.device)
            torch.distributed.all_reduce(total)
            total = total.cpu()
        for rows, micro in micro_batches:
            # Nothing to average (every sample masked out): micro-batches weigh by their rows.
            share = units[rows].sum() * self.world_size / total if total > 0 else len(rows) / len(minibatch)
            self._start_micro_batch()
            loss, stats = self.objective.loss(self.module, to_device(micro, self.device), **loss_kwargs)
            loss = loss + orthogonality_penalty(self.module)
            self.engine.backward(loss * float(share), scale_wrt_gas=False)
            for key, value in stats.items():
                sums[key] += float(value)
            sums["_count"] += 1
        self.last_lr = self.engine.get_lr()[0]
        self.engine.step()
        return [rows for rows, _ in micro_batches]

    def _start_micro_batch(self) -> None:
        """What DeepSpeed's own forward does first, for the ZeRO optimizers: it ends the previous
        micro-batch's backward bookkeeping. Our losses call the model itself (the scalar heads go
        around its top module), and without this ZeRO-3 copied each micro-batch's gradient over the
        last one's instead of adding it: a step followed the last micro-batch alone."""
        clear = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, float]:
        """Held-out sums over this rank's share (objective.held_out_sums; the driver adds them up
        over ranks)."""
        self.module.eval()
        sums: dict[str, float] = defaultdict(float)
        for part in self._forwards(batch.minibatches(self.cfg.micro_batch_size), lambda micro:
                                   self.objective.held_out_sums(self.module, to_device(micro, self.device))):
            for key, value in part.items():
                sums[key] += value
        return dict(sums)

    def save_checkpoint(self, path: str) -> None:
        """Weights, optimizer and learning-rate schedule (DeepSpeed's format; every rank writes its
        shards), and this rank's random number generators (dropout draws from them). With a peft
        method only the trained weights: the frozen base loads from the model path again."""
        self.engine.save_checkpoint(path, tag="deepspeed", exclude_frozen_parameters=self._peft,
                                    client_state={"adalora": adalora_state(self.module)})
        save_rng_states(path, self.rank, self.device)

    @property
    def _peft(self) -> bool:
        return self.cfg.peft.method != "none"

    def load_checkpoint(self, path: str) -> None:
        # (not strict with a peft method: the checkpoint has no frozen weights, but a 4-bit base's
        # quantization constants, which are no parameters, are there and are the loaded base's)
        loaded, client_state = self.engine.load_checkpoint(path, tag="deepspeed",
                                                           load_module_strict=not self._peft)
        if loaded is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {path}")
        load_adalora_state(self.module, client_state.get("adalora", {}))
        load_rng_states(path, self.rank, self.device)

    def save(self, path: str) -> None:
        """HF-format checkpoint of the plain model (LoRA merged, full weights gathered from ZeRO-3
        shards), written by rank 0; transformers and vLLM load it directly."""
        state = {}
        for name, parts, compute in hf_weights(self.module):
            with weight_sync.gathered(parts):
                if self.rank == 0:
                    state[name] = compute().detach().cpu().clone()
        if self.rank == 0:
            save_plain(self.module, path, state)
        if self.cfg.peft.method in SOFT_PROMPT_PEFT:  # the virtual tokens, for peft to load on top of it,
            # with the scalar head peft also trains; every rank computes them (under ZeRO-3 their
            # encoder's forward gathers its weights collectively, and the head is gathered here)
            head = [p for name, p in self.module.named_parameters() if ".modules_to_save." in name]
            with weight_sync.gathered(head):
                self.module.save_pretrained(f"{path}/{SOFT_PROMPT_DIR}", is_main_process=self.rank == 0)


def _count(params) -> int:
    return sum(math.prod(dense_spec(p)[0]) for p in params)


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (1-based, of `total`) as a fraction of the
    configured one: i / (warmup + 1) for the warm-up steps i, then constant, or from 1 at the first
    step after warm-up down to `min_ratio` at the last, linearly or along a half cosine."""
    if step <= warmup:
        return step / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup - 1) / max(1, total - warmup - 1))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
