"""The rollout service: the engines' generations, sent and collected as batches in the shared token
layout, the weights the engines hold, and the restarts of engines that die."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import ray
import torch
from tqdm import tqdm

from rayrlhf.algorithms import response_mask
from rayrlhf.batch import Batch, build_batch, concat_batches
from rayrlhf.cluster import RoleClock, RoleGroup
from rayrlhf.data import Prompt, through_template
from rayrlhf.errors import RayRLHFError
from rayrlhf.weight_channel import WeightChannel


@dataclass
class Rollout:
    batch: Batch
    # Each sample's prompt as the dataset gives it (a string or a conversation, data.Prompt.text).
    prompts: list
    responses: list[str]
    # The prompts' dataset columns, one list per column, one entry per sample.
    fields: dict[str, list]
    # The prompts it was generated from, one entry per prompt.
    source: list[Prompt]
    # The weight version (syncs before it) of the oldest weights any of its samples came from.
    version: int = 0
    # With rollout.env, each trajectory's environment metrics (turns, env_seconds, tool_calls, ...),
    # one list per metric, NaN where a trajectory's environment has no such metric.
    env_metrics: dict[str, list[float]] = field(default_factory=dict)
    # Why the environment failed on a sample (rollout.env_errors=skip), by sample.
    env_errors: dict[int, str] = field(default_factory=dict)
    # The reward sources' own metrics (e.g. math_answered), one value per sample, once it is scored.
    reward_metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def groups(self, index: list[int], size: int) -> Rollout:
        """The samples of the prompt groups `index`, in that order (group g: the `size` samples of
        prompt g, rows g x size ...)."""
        rows = [g * size + k for g in index for k in range(size)]
        new_row = {old: new for new, old in enumerate(rows)}

        def pick(values: list) -> list:
            return [values[i] for i in rows]

        return Rollout(self.batch.select(torch.tensor(rows, dtype=torch.long)), pick(self.prompts),
                       pick(self.responses), {k: pick(v) for k, v in self.fields.items()},
                       [self.source[g] for g in index], self.version,
                       {k: pick(v) for k, v in self.env_metrics.items()},
                       {new_row[i]: why for i, why in self.env_errors.items() if i in new_row},
                       {k: v[rows] for k, v in self.reward_metrics.items()})


def join_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of the samples of `parts`, in order, in one batch layout (batch.concat_batches);
    a metric some part lacks is NaN on its samples. Its version is the oldest part's."""
    starts = itertools.accumulate([len(p.prompts) for p in parts], initial=0)

    def joined(values) -> list:
        return [v for part in values for v in part]

    def per_sample(metrics) -> dict:
        keys = dict.fromkeys(k for p in parts for k in getattr(p, metrics))
        return {k: joined(getattr(p, metrics).get(k, [float("nan")] * len(p.prompts)) for p in parts)
                for k in keys}

    return Rollout(concat_batches([p.batch for p in parts], pad_id), joined(p.prompts for p in parts),
                   joined(p.responses for p in parts),
                   {k: joined(p.fields[k] for p in parts) for k in parts[0].fields},
                   joined(p.source for p in parts), min(p.version for p in parts), per_sample("env_metrics"),
                   {start + i: why for start, p in zip(starts, parts, strict=False)
                    for i, why in p.env_errors.items()},
                   {k: torch.tensor(v, dtype=torch.float32) for k, v in per_sample("reward_metrics").items()})


@dataclass
class PendingGeneration:
    """A generation sent to the engines: shard i goes to engine i. A shard lost with its engine
    (refs[i] None) is sent again, to the restarted engine, with the weights of that time."""
    prompts: list[Prompt]
    shards: list[tuple]
    greedy: bool
    refs: list
    versions: list[int]


def split_evenly(items: list, parts: int) -> list[list]:
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([list(r) + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32)


class RolloutService:
    def __init__(self, cfg, engines: RoleGroup, actor: RoleGroup, clock: RoleClock, pad_token_id: int):
        self.cfg, self.engines, self.clock, self.pad_token_id = cfg, engines, clock, pad_token_id
        self.weights = WeightChannel(cfg, actor, engines, clock)
        self.restarts = 0
        # Weight syncs so far, and the generations the engines have not finished (oldest first).
        self.weight_version = 0
        self.in_flight: list[PendingGeneration] = []

    def generate(self, prompts: list[Prompt], step: int, greedy: bool = False, attempt: int = 0) -> Rollout:
        """Every prompt's `rollout.n` samples (one if greedy), as one batch in the shared layout."""
        return self.finish_generation(self.start_generation(prompts, step, greedy, attempt))

    def start_generation(self, prompts: list[Prompt], step: int, greedy: bool = False,
                         attempt: int = 0) -> PendingGeneration:
        """Sends the prompts to the engines and returns at once (the engines run their calls in
        order, so a weight sync sent later waits for this generation).

        Sampling is seeded per prompt from (run seed, step, attempt: the step's round of dynamic
        sampling, position), so it is reproducible. The engine seeds a prompt's k-th sample with its
        seed + k, so the prompts' seeds are `rollout.n` apart: no two samples of a step share a
        random stream (with neighbouring seeds, prompt i's second sample drew prompt i+1's first
        one's numbers)."""
        # A step's first round keeps the seeds it had before there were rounds.
        base = random.Random(f"{self.cfg.seed}:{step}" + (f":{attempt}" if attempt else "")).randrange(2**31)
        spacing = self.cfg.rollout.n
        seeds = [(base + i * spacing) % 2**31 for i in range(len(prompts))]
        n = len(self.engines.actors)
        columns = [split_evenly([p.token_ids for p in prompts], n), split_evenly(seeds, n)]
        if self.cfg.rollout.env:  # the environments get the rows
            rows = [{"prompt": p.text, "fields": p.fields, "row": p.row,
                     "chat": through_template(p.text, self.cfg.data.chat_template)} for p in prompts]
            columns.append(split_evenly(rows, n))
        shards = list(zip(*columns, strict=True))
        refs = self.engines.scatter("generate", shards, greedy=greedy)
        pending = PendingGeneration(prompts, shards, greedy, refs, [self.weight_version] * n)
        self.in_flight.append(pending)
        return pending

    def finish_generation(self, pending: PendingGeneration) -> Rollout:
        def collect():
            for rank, ref in enumerate(pending.refs):
                if ref is None:  # lost with its engine: to the restarted one, with today's weights
                    pending.refs[rank] = self.engines.actors[rank].generate.remote(
                        *pending.shards[rank], greedy=pending.greedy)
                    pending.versions[rank] = self.weight_version
            return self.clock.wait_roles({"rollout_generate": pending.refs}, "generation")["rollout_generate"]

        parts = self._with_engines(collect)
        self.in_flight.remove(pending)
        prompts = pending.prompts
        per_prompt = [s for part in parts for s in part]
        flat = [(prompt, sample) for prompt, samples in zip(prompts, per_prompt, strict=True)
                for sample in samples]
        samples = [s for _, s in flat]
        batch = build_batch([p.token_ids for p, _ in flat], [s.response_ids for s in samples],
                            self.pad_token_id)
        width = batch["sequences"].shape[1] - batch.prompt_len
        batch["mask"] = response_mask(batch["sequences"][:, batch.prompt_len:], batch["response_lengths"])
        if self.cfg.rollout.env:  # only the model's tokens are trained on; the environment scores
            batch["mask"] = pad_rows([s.action_mask for s in samples], width)
            batch["env_scores"] = torch.tensor([s.env_reward for s in samples], dtype=torch.float32)
            batch["env_failed"] = torch.tensor([s.env_error is not None for s in samples],
                                               dtype=torch.float32)
        batch["engine_logprobs"] = pad_rows([s.logprobs for s in samples], width)
        batch["truncated"] = torch.tensor([not s.finished for s in samples], dtype=torch.float32)
        field_names = flat[0][0].fields.keys()
        env_metrics = {k: [s.env_metrics.get(k, float("nan")) for s in samples]
                       for k in dict.fromkeys(k for s in samples for k in s.env_metrics)}
        return Rollout(batch, [p.text for p, _ in flat], [s.text for s in samples],
                       {k: [p.fields.get(k) for p, _ in flat] for k in field_names}, prompts,
                       min(pending.versions), env_metrics,
                       {i: s.env_error for i, s in enumerate(samples) if s.env_error is not None})

    def generations_in_progress(self) -> int:
        """Generations sent to the engines that they have not finished yet (or lost with an engine)."""
        def unfinished(pending: PendingGeneration) -> bool:
            sent = [ref for ref in pending.refs if ref is not None]
            return len(sent) < len(pending.refs) or bool(ray.wait(sent, num_returns=len(sent), timeout=0)[1])

        return sum(map(unfinished, self.in_flight))

    def sync_weights(self) -> int:
        """Actor weights -> every engine; returns the bytes sent. Each engine loads them once it has
        finished the generations sent before, so every generation sent from now on samples with them.
        Synchronously that is at once. Asynchronously the engines may still have generations queued:
        their loads are awaited only before the next sync writes again, so the trainers go on."""
        sent = self._with_engines(self.weights.send)
        self.weight_version += 1
        return sent

    def release(self) -> None:
        """With rollout.sleep, the engines free their GPU memory until the next weight sync."""
        if self.cfg.rollout.sleep:
            self._with_engines(lambda: self.clock.wait_roles({"rollout_sleep": self.engines.call("sleep")},
                                                             "engine sleep"))

    def _with_engines(self, call):
        """call(), which uses the engines. An engine that died (killed, out of memory) is started
        again on its bundle and given the current weights, and call() is tried again, up to
        rollout.max_restarts engine restarts in the run. With the collective transport, the engines
        still inside a load when one died are restarted too: the broadcast they wait in cannot end.
        The generations the dead engines had queued are sent again (see finish_generation)."""
        while True:
            try:
                return call()
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                dead = self._dead_engines()
                if not dead:
                    raise
                if self.weights.streamed:
                    dead = sorted(set(dead) | set(self.weights.engines_loading()))
                self.restarts += len(dead)
                limit = self.cfg.rollout.max_restarts
                if self.restarts > limit:
                    raise RayRLHFError(f"rollout engine(s) {dead} died and the run has used its "
                                       f"rollout.max_restarts={limit} engine restarts") from err
                tqdm.write(f"rollout engine(s) {dead} died; restarting them with the current weights "
                           f"({self.restarts} of rollout.max_restarts={limit} restarts used)")
                for rank in dead:
                    self.engines.restart(rank, self.cfg.ray.node_loss_timeout_s)
                    for pending in self.in_flight:
                        pending.refs[rank] = None
                self.clock.wait([a.__ray_ready__.remote() for a in self.engines.actors], "engine restart")
                self.weights.resend()

    def _dead_engines(self) -> list[int]:
        """Engines whose process is gone: their liveness probe fails at once, while a live engine's
        waits behind the call it is busy with."""
        probes = [engine.__ray_ready__.remote() for engine in self.engines.actors]
        ray.wait(probes, num_returns=len(probes), timeout=5)
        dead = []
        for rank, probe in enumerate(probes):
            try:
                ray.get(probe, timeout=0)
            except ray.exceptions.RayActorError:
                dead.append(rank)
            except ray.exceptions.GetTimeoutError:
                pass  # alive, busy
        return dead
