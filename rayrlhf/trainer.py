"""The trainer worker: one data-parallel DeepSpeed ZeRO rank of the actor or the critic."""

from __future__ import annotations

import math
import os
import random
import socket
from collections import defaultdict

import torch

from rayrlhf import weight_sync
from rayrlhf.algorithms import (
    Sampling,
    aggregate,
    kl_estimate,
    pairwise_loss,
    policy_loss,
    sft_nll,
    value_loss,
)
from rayrlhf.batch import Batch, balanced_groups, build_batch, prompt_groups, segment_sizes
from rayrlhf.lora import apply_lora, hf_weights, plain_model
from rayrlhf.modeling import (
    DTYPES,
    default_device,
    load_causal_lm,
    load_scalar_model,
    pair_scores,
    policy_logprobs,
    policy_logprobs_and_entropy,
    sft_logits,
    to_device,
    token_values,
)
from rayrlhf.onednn import onednn_chosen, use_onednn_linear

# Roles whose model is a causal LM; the others (critic, reward model) have a scalar head.
CAUSAL_ROLES = ("actor", "sft")


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


class TrainerWorker:
    """`role` is "actor" (policy, clipped surrogate loss), "critic" (values, clipped value loss),
    "sft" (next-token loss on response tokens) or "rm" (pairwise reward-model loss)."""

    def __init__(self, role: str, rank: int, world_size: int):
        self.role, self.rank, self.world_size = role, rank, world_size
        self.broadcaster: weight_sync.Broadcaster | None = None  # rank 0, collective transport
        self.shared_weights: torch.Tensor | None = None  # the /dev/shm file rank 0 writes to
        # Weight sync senders: rank 0, or with CUDA IPC each rank with an engine on its GPU,
        # which writes the weights into `ipc_buffer` for the duration of a sync.
        self.weight_sender = rank == 0
        self.cuda_ipc = False
        self.ipc_buffer: torch.Tensor | None = None

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
        self.cfg, self.algo, self.sampling, self.norm_len = role_cfg, algo_cfg, sampling, norm_len
        dtype = model_cfg.dtype
        ds_config = deepspeed_config(role_cfg, train_batch_size, self.world_size, dtype)
        if role_cfg.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # Kept alive so from_pretrained loads straight into ZeRO-3 partitions.
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        scalar_head = self.role not in CAUSAL_ROLES
        model = (load_scalar_model if scalar_head else load_causal_lm)(model_path, dtype)
        if role_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if role_cfg.lora.rank:
            model = apply_lora(model, role_cfg.lora, scalar_head)
            if role_cfg.gradient_checkpointing:
                model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
        if onednn_chosen(model_cfg.linear_backend):
            use_onednn_linear(model)
            if role_cfg.compile and self.rank == 0:
                print(f"{self.role}: model.linear_backend picked oneDNN, which torch.compile cannot lower: "
                      "the compiled layers use inductor's own products, the rest oneDNN's", flush=True)
        if role_cfg.compile:
            # The backbone, which every role's forward calls (the scalar heads bypass the top
            # module); torch compiles it at its first forward and backward.
            plain_model(model).base_model.compile(dynamic=True)
        trained = [p for p in model.parameters() if p.requires_grad]

        def schedule(optimizer):  # DeepSpeed steps it after each optimizer step and checkpoints it
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda taken: lr_factor(
                taken + 1, role_cfg.lr_schedule, role_cfg.warmup_steps, total_steps, role_cfg.min_lr_ratio))

        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=trained, config=ds_config,
                                               lr_scheduler=schedule)
        if self.world_size == 1 and role_cfg.zero_stage == 0:
            # One rank has nothing to all-reduce, but DeepSpeed would still copy every gradient
            # through a buffer at each step.
            self.engine.enable_backward_allreduce = False
        self.dtype = DTYPES[dtype]
        if role_cfg.compile and self.role in ("actor", "critic"):
            self._compile_now()

    def _compile_now(self) -> None:
        """One forward and backward of a made-up batch in the PPO layout, so that torch compiles
        during set-up, beside the engines' own start-up, rather than in the first step. Its
        gradients go nowhere: `autograd.grad` leaves `.grad` and DeepSpeed's hooks untouched."""
        # Two prompt groups of uneven lengths, so that no size the model sees is 0 or 1 and no
        # two are equal by chance (as packed rows without end padding would make the token count
        # and the grid's): torch specialises sizes 0 and 1 and ties equal ones, and a real batch
        # that differed would compile again at the first step.
        prompts, responses = [[4, 5, 6]] * 2 + [[7, 8]] * 2, [[10, 11, 12], [13, 14], [15, 16], [17]]
        batch = to_device(build_batch(prompts, responses, 0), self.device)
        self.module.train()
        if self.role == "actor":
            out = policy_logprobs(self.module, batch, self.sampling, self.packing)
        else:
            out = token_values(self.module, batch, self.packing)
        weight = next(p for p in self.module.parameters() if p.requires_grad)
        torch.autograd.grad(out.sum(), [weight], allow_unused=True)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def packing(self) -> str:
        """How PPO batches are laid out for the model (see modeling._scoring_inputs)."""
        if not self.cfg.packing:
            return "none"
        return "prompts" if self.cfg.share_prompts else "samples"

    @torch.no_grad()
    def infer(self, batch: Batch) -> torch.Tensor:
        """Old log-probs (actor) or old values (critic) of this rank's share of the batch."""
        self.module.eval()
        out = torch.zeros(batch["mask"].shape)
        for rows, micro in self._micro_batches(batch):
            micro = to_device(micro, self.device)
            if self.role == "actor":
                out[rows] = policy_logprobs(self.module, micro, self.sampling, self.packing).float().cpu()
            else:
                out[rows] = token_values(self.module, micro, self.packing).cpu()
        return out

    def _micro_batches(self, batch: Batch) -> list[tuple[torch.Tensor, Batch]]:
        """(row indices, rows) of each micro-batch: micro_batch_size rows at a time, or, with
        micro_batch_tokens, groups of about that many real tokens balanced by tokens, as many on
        every rank (ZeRO-3 gathers weights collectively in every forward)."""
        if not self.cfg.micro_batch_tokens:
            size = self.cfg.micro_batch_size
            return [(torch.arange(i, min(i + size, len(batch))), batch.select(slice(i, i + size)))
                    for i in range(0, len(batch), size)]
        rows = [[row] for row in range(len(batch))]
        tokens = _row_tokens(batch).tolist()
        count = torch.tensor([-(-sum(tokens) // self.cfg.micro_batch_tokens)], device=self.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        units, unit_tokens = rows, tokens
        if self.role in ("actor", "critic") and self.packing == "prompts":
            groups = prompt_groups(batch)  # kept whole where there are enough to go round
            if len(groups) >= int(count):
                units, unit_tokens = groups, segment_sizes(batch, groups)
        parts = balanced_groups(unit_tokens, int(count))
        if len(parts) < int(count):
            raise ValueError(f"{len(batch)} rows cannot fill {int(count)} micro-batches")
        return [(index, batch.select(index)) for index in
                (torch.tensor([row for unit in part for row in units[unit]]) for part in parts)]

    def _shuffled(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """A random order of the rows; with shared prompts, of whole prompt groups, so that the
        responses to one prompt stay together in a micro-batch and share its computation."""
        if self.packing != "prompts":
            return torch.randperm(len(batch), generator=generator)
        groups = prompt_groups(batch)
        return torch.tensor([row for g in torch.randperm(len(groups), generator=generator).tolist()
                             for row in groups[g]])

    def _sft_nll(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood of the response tokens, and their count."""
        logits = sft_logits(self.module, batch)
        return sft_nll(logits, batch["sequences"], batch["loss_mask"]).sum(), batch["loss_mask"][:, 1:].sum()

    def _pair_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores [B, 2] of the preference pairs, the pairwise loss and the accuracy."""
        scores = pair_scores(self.module, batch)
        return scores, *pairwise_loss(scores[:, 0], scores[:, 1])

    def _loss(self, batch: Batch, kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.role == "sft":
            nll, tokens = self._sft_nll(batch)
            loss = nll / tokens.clamp(min=1)
            return loss, {"loss/sft": loss.detach()}
        if self.role == "rm":
            scores, loss, accuracy = self._pair_loss(batch)
            return loss, {"loss/rm": loss.detach(), "rm/accuracy": accuracy,
                          "rm/margin": (scores[:, 0] - scores[:, 1]).mean().detach()}
        if self.role == "critic":
            values = token_values(self.module, batch, self.packing)
            clip = self.algo.value_clip_eps or None
            loss, stats = value_loss(values, batch["old_values"], batch["returns"], batch["mask"], clip)
            return loss, {"loss/value": loss.detach(), "critic/clip_frac": stats["clip_frac"]}

        algo, mask = self.algo, batch["mask"]
        logprobs, entropy = policy_logprobs_and_entropy(self.module, batch, self.sampling,
                                                        with_entropy=algo.entropy_coef > 0,
                                                        packing=self.packing)
        if "old_logprobs" in batch.tensors:
            old_logprobs = batch["old_logprobs"]
        else:  # the only optimizer step of the batch: pi_old is the policy of this forward
            old_logprobs = logprobs.detach()
            self.forward_logprobs.append(old_logprobs.float().cpu())
        is_weights = None
        if algo.tis_cap is not None:
            # The samples came from the engine's policy; correct toward the trainer's pi_old.
            is_weights = torch.exp(old_logprobs - batch["engine_logprobs"]).clamp(max=algo.tis_cap)
        loss, stats = policy_loss(logprobs, old_logprobs, batch["advantages"], mask,
                                  algo.clip_eps, algo.clip_eps_high, algo.dual_clip, algo.loss_agg,
                                  self.norm_len, is_weights)
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

    def train(self, batch: Batch, seed: int, kl_coef: float) -> tuple[dict[str, float], torch.Tensor | None]:
        """PPO epochs over this rank's share: minibatches of train_batch_size / ranks, each
        accumulated over micro-batches; DeepSpeed all-reduces and steps at each minibatch end.

        Returns the mean stats and, for an actor batch without old_logprobs (one optimizer step
        per batch), the log-probs its training forward found, in the batch's row order."""
        per_rank = self.algo.train_batch_size // self.world_size
        from_forward = self.role == "actor" and "old_logprobs" not in batch.tensors
        if from_forward and (self.algo.ppo_epochs > 1 or per_rank < len(batch)):
            raise ValueError("a batch without old_logprobs must get exactly one optimizer step")
        generator = torch.Generator().manual_seed(seed)
        sums: dict[str, float] = defaultdict(float)
        self.forward_logprobs: list[torch.Tensor] = []
        for _ in range(self.algo.ppo_epochs):
            order = self._shuffled(batch, generator)
            for minibatch in batch.select(order).minibatches(per_rank):
                rows = self._optimizer_step(minibatch, sums, kl_coef=kl_coef)
        if not from_forward:
            return self._means(sums), None
        old_logprobs = torch.empty_like(batch["engine_logprobs"])
        old_logprobs[order[torch.cat(rows)]] = torch.cat(self.forward_logprobs)
        return self._means(sums), old_logprobs

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on this rank's share of a batch (SFT and reward-model training)."""
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
        units = self._loss_units(minibatch)
        total = units.sum()
        if self.world_size > 1:
            total = total.to(self.device)
            torch.distributed.all_reduce(total)
            total = total.cpu()
        for rows, micro in micro_batches:
            # Nothing to average (every sample masked out): micro-batches weigh by their rows.
            share = units[rows].sum() * self.world_size / total if total > 0 else len(rows) / len(minibatch)
            self._start_micro_batch()
            loss, stats = self._loss(to_device(micro, self.device), **loss_kwargs)
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

    def _loss_units(self, batch: Batch) -> torch.Tensor:
        """Per row, what the role's loss averages over: tokens, or the row itself where it takes
        part (a preference pair; a response with a valid token for the sequence-mean losses)."""
        if self.role == "sft":
            return batch["loss_mask"][:, 1:].sum(1).float()
        if self.role == "rm":
            return torch.ones(len(batch))
        if self.role == "critic" or self.algo.loss_agg == "token_mean":
            return batch["mask"].sum(1)
        return (batch["mask"].sum(1) > 0).float()

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, float]:
        """Held-out sums over this rank's share: SFT token NLL and token count; reward-model loss,
        correctly ordered pairs and pair count (the driver adds them up over ranks)."""
        self.module.eval()
        micro_batches = batch.minibatches(self.cfg.micro_batch_size)
        # Every rank runs as many forwards (under ZeRO-3 each gathers the weights collectively):
        # shares that differ by a row may differ by a micro-batch, so the shorter ones run their
        # first row again, uncounted.
        count = torch.tensor([len(micro_batches)], device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        for _ in range(int(count) - len(micro_batches)):
            self._held_out_sums(batch.select(slice(0, 1)))
        sums: dict[str, float] = defaultdict(float)
        for micro in micro_batches:
            for key, value in self._held_out_sums(micro).items():
                sums[key] += value
        return dict(sums)

    def _held_out_sums(self, micro: Batch) -> dict[str, float]:
        micro = to_device(micro, self.device)
        if self.role == "sft":
            nll, tokens = self._sft_nll(micro)
            return {"nll": float(nll), "tokens": float(tokens)}
        _, loss, accuracy = self._pair_loss(micro)
        pairs = len(micro)
        return {"loss": float(loss) * pairs, "correct": float(accuracy) * pairs, "pairs": pairs}

    # Weight sync (actor only). Every rank takes part in sending (ZeRO-3 gathers are collective).

    def weight_sync_plan(self, bucket_mb: float) -> list:
        return weight_sync.plan_buckets(weight_sync.parameter_specs(self.module),
                                        int(bucket_mb * 2**20))

    def join_weight_sync(self, master_addr: str, port: int, world_size: int, backend: str,
                         timeout_s: float) -> None:
        if self.broadcaster is not None:  # the engines join a new group after a restart
            self.broadcaster.close()
        self.broadcaster = weight_sync.Broadcaster(
            weight_sync.join_group(master_addr, port, 0, world_size, backend, timeout_s))

    def share_weights(self, plan, place: bool) -> str | None:
        """Creates and maps the shared-memory file (rank 0); its path, or None without room. With
        `place`, the parameters move into it where nothing else re-lays them out."""
        created = weight_sync.create_shared_file(plan)
        if created is None:
            return None
        self.shared_path, self.shared_weights = created
        # With nothing re-laying the parameters out (DeepSpeed flattens them under ZeRO 1-3 and
        # in its bf16/fp16 optimizers), they can live in the file itself: no copy at each sync.
        if place and self.world_size == 1 and self.cfg.zero_stage == 0 and self.dtype == torch.float32:
            weight_sync.place_in_shared(self.module, self.shared_weights, plan)
        return self.shared_path

    def unlink_shared_weights(self) -> None:
        """Once the engines have mapped the file: the mappings keep it while it is in use."""
        os.unlink(self.shared_path)

    def use_cuda_ipc(self, sender: bool) -> None:
        self.cuda_ipc, self.weight_sender = True, sender

    def send_weights(self, plan) -> tuple[int, tuple | None]:
        """Bytes sent, and with CUDA IPC the handle of the buffer this rank wrote (kept until
        release_weights_buffer, after the engines have loaded from it)."""
        shared = self.shared_weights
        if self.cuda_ipc and self.weight_sender:
            size = weight_sync.shared_offsets(plan)[-1]
            shared = self.ipc_buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        sent = weight_sync.send_buckets(self.module, plan, self.weight_sender, self.device,
                                        broadcaster=self.broadcaster, shared=shared)
        if self.ipc_buffer is None:
            return sent, None
        torch.cuda.synchronize(self.device)
        return sent, weight_sync.cuda_ipc_handle(self.ipc_buffer)

    def release_weights_buffer(self) -> None:
        self.ipc_buffer = None

    def save_checkpoint(self, path: str) -> None:
        """Weights, optimizer and learning-rate schedule (DeepSpeed's format; every rank writes its
        shards), and this rank's random number generators (dropout draws from them)."""
        self.engine.save_checkpoint(path, tag="deepspeed")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, os.path.join(path, f"rng_rank{self.rank}.pt"))

    def load_checkpoint(self, path: str) -> None:
        loaded, _ = self.engine.load_checkpoint(path, tag="deepspeed")
        if loaded is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {path}")
        rng = torch.load(os.path.join(path, f"rng_rank{self.rank}.pt"), weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save(self, path: str) -> None:
        """HF-format checkpoint of the plain model (LoRA merged, full weights gathered from ZeRO-3
        shards), written by rank 0; transformers and vLLM load it directly."""
        state = {}
        for name, parts, compute in hf_weights(self.module):
            with weight_sync.gathered(parts):
                if self.rank == 0:
                    state[name] = compute().detach().cpu().clone()
        if self.rank == 0:
            plain_model(self.module).save_pretrained(path, state_dict=state, safe_serialization=True)


def _row_tokens(batch: Batch) -> torch.Tensor:
    """Real tokens in each row (a preference pair's two sequences together)."""
    if "attention_mask" in batch.tensors:
        return batch["attention_mask"].flatten(1).sum(1)
    return (batch["segment_ids"] > 0).sum(1)


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
