"""Ray start-up, placement and calls: each role is a group of actors on a placement group of its
own (or one it shares with colocated roles), and every call to them has a deadline."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from rayrlhf.errors import RayRLHFError
from rayrlhf.metrics import process_memory

PLACEMENT_TIMEOUT_S = 120
NODE_SLOT_ENV = "RAYRLHF_NODE_SLOT"


def start_ray(ray_cfg) -> bool:
    """Connect to `ray.address`, or start a local single-node cluster. True if we started it."""
    if ray.is_initialized():
        return False
    common = {"log_to_driver": ray_cfg.log_to_driver, "logging_level": logging.WARNING}
    if ray_cfg.address:
        ray.init(address=ray_cfg.address, **common)
        return False
    ray.init(num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.dashboard, dashboard_host="127.0.0.1",
             **common)
    return True


def actor_env(threads: int, gpus: float) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}


def reserve(name: str, bundles: list[dict[str, float]], strategy: str, node_labels: dict[str, str]):
    """A ready placement group (its bundles on nodes carrying `node_labels`), or an error saying
    what could not be placed."""
    # Unique names: a driver may hold two groups of one role (a test comparing rank counts).
    placement = placement_group(bundles, strategy=strategy, name=f"rayrlhf-{name}-{uuid.uuid4().hex[:8]}",
                                bundle_label_selector=[node_labels] * len(bundles) if node_labels else None)
    try:
        ray.get(placement.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(placement)
        on = f" ({strategy}) on nodes labelled {node_labels}" if node_labels else f" ({strategy})"
        raise RayRLHFError(f"cannot place {name}: it needs bundles {bundles}{on} and the cluster has "
                           f"{ray.available_resources()} free") from None
    return placement


class Colocation:
    """The placement groups of colocated roles (`ray.colocate`): bundle i of a group's holds actor i
    of each role in it, with their cpus and gpus added up. `sizes` gives (actors, cpus, gpus per
    actor) of every role the run starts; a group with fewer than two of them shares nothing."""

    def __init__(self, groups: list[list[str]], sizes: dict[str, tuple[int, float, float]],
                 where: Callable[[str], dict]):
        self.placements: dict[str, object] = {}
        self.reserved = []
        try:
            for members in groups:
                present = [role for role in members if role in sizes]
                if len(present) < 2:
                    continue
                count = max(sizes[role][0] for role in present)
                bundles = [bundle(sum(sizes[role][1] for role in present if sizes[role][0] > i),
                                  sum(sizes[role][2] for role in present if sizes[role][0] > i))
                           for i in range(count)]
                self.reserved.append(reserve(f"colocated roles {'+'.join(present)}", bundles,
                                             **where(present[0])))
                self.placements |= dict.fromkeys(present, self.reserved[-1])
        except BaseException:
            self.release()
            raise

    def placement(self, role: str):
        """The shared placement group of `role`, or None for a role with one of its own."""
        return self.placements.get(role)

    def release(self) -> None:
        for placement in self.reserved:
            remove_placement_group(placement)
        self.reserved = []


class RoleGroup:
    """`count` actors of `cls`, actor i on bundle i of a placement group: the role's own, one
    bundle of {cpus, gpus} per actor placed by `where` (reserve's strategy and node_labels), or one
    it shares with colocated roles (`placement`)."""

    def __init__(self, name: str, cls: type, count: int, cpus: float, gpus: float, threads: int,
                 args: Callable[[int], tuple] = lambda rank: (), where: dict | None = None, placement=None):
        self.name = name
        self.owns_placement = placement is None
        self.placement = placement or reserve(f"role '{name}'", [bundle(cpus, gpus)] * count,
                                              **(where or {"strategy": "PACK", "node_labels": {}}))
        self.actors: list[Any] = []
        self._remote_cls, self._args = ray.remote(cls), args
        self._options = {"num_cpus": cpus, "num_gpus": gpus,
                         "runtime_env": {"env_vars": actor_env(threads, gpus)}}
        # The node each actor was started on (a lost node's bundles may since have moved).
        self.node_ids = self._bundle_nodes()[:count]
        self.actors = [self._start(rank) for rank in range(count)]

    def _start(self, rank: int):
        strategy = PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank)
        options = {"scheduling_strategy": strategy, **self._options}
        # Which of the role's actors on its node this one is, for actors that pin threads to cores.
        slot = self.node_ids[:rank].count(self.node_ids[rank])
        env = {**options["runtime_env"]["env_vars"], NODE_SLOT_ENV: str(slot)}
        options["runtime_env"] = {"env_vars": env}
        return self._remote_cls.options(**options).remote(*self._args(rank))

    def _bundle_nodes(self) -> list[str | None]:
        """The node id of each bundle of the placement group, in bundle order (None for a bundle
        not placed: one whose node was lost, until Ray places it again)."""
        table = ray.util.placement_group_table(self.placement)
        return [table["bundles_to_node_id"].get(i) for i in range(len(table["bundles"]))]

    def restart(self, rank: int, timeout_s: float) -> None:
        """A fresh actor for `rank` on its bundle, in place of one that died. Where its node is lost,
        Ray places the bundle again on a node with room; if that does not happen within `timeout_s`
        of the node's loss being known, NodeLost."""
        ray.kill(self.actors[rank], no_restart=True)
        node, deadline = self.node_ids[rank], time.monotonic() + timeout_s
        # A node whose raylet died is declared dead only after missed health checks: until then it
        # is listed alive but runs nothing (an actor started there would wait, then die).
        while node in alive_nodes() and not node_answers(node):
            if time.monotonic() > deadline:
                raise NodeLost(node, timeout_s)
        if node not in alive_nodes():
            deadline = time.monotonic() + timeout_s  # the wait for room, from the node's death
            while (self._bundle_nodes()[rank] or node) not in alive_nodes() - {node}:
                if time.monotonic() > deadline:
                    raise NodeLost(node, timeout_s)
                time.sleep(0.5)
            self.node_ids[rank] = self._bundle_nodes()[rank]
        self.actors[rank] = self._start(rank)

    def lost(self) -> list[tuple[str, int]]:
        """(node id, rank) of each actor whose node is gone."""
        alive = alive_nodes()
        return [(node, rank) for rank, node in enumerate(self.node_ids) if node not in alive]

    def find(self, actor_id: str) -> int | None:
        """The rank of the actor with this id (hex), if it is one of ours."""
        return next((i for i, a in enumerate(self.actors) if a._actor_id.hex() == actor_id), None)

    def nodes(self) -> list[str]:
        """The node holding each actor (node_label)."""
        return [node_label(node) for node in self.node_ids]

    def call(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """The same call on every actor."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def scatter(self, method: str, shards: list[tuple], **kwargs) -> list[ray.ObjectRef]:
        """Actor i gets the arguments in shards[i]."""
        pairs = zip(self.actors, shards, strict=True)
        return [getattr(a, method).remote(*shard, **kwargs) for a, shard in pairs]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.owns_placement:
            remove_placement_group(self.placement)


class NodeLost(RayRLHFError):
    """A node is gone with actors that cannot go elsewhere (no other node has room)."""

    def __init__(self, node_id: str, waited_s: float):
        super().__init__(f"node {node_label(node_id)} was lost and no node had room for its actors within "
                         f"{waited_s:.0f} s (ray.node_loss_timeout_s)")
        self.node_id, self.waited_s = node_id, waited_s


def alive_nodes() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


@ray.remote(num_cpus=0)
def _on_node() -> None:
    pass


def node_answers(node_id: str, timeout_s: float = 10.0) -> bool:
    """Whether the node runs a task within `timeout_s`."""
    probe = _on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    try:
        ray.get(probe, timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        ray.cancel(probe, force=True)
        return False
    return True


def node_label(node_id: str) -> str:
    """A node as its IP, and its id's start where several nodes share that IP (Ray nodes of one
    machine): how placement and losses are reported."""
    nodes = ray.nodes()
    ip = next((n["NodeManagerAddress"] for n in nodes if n["NodeID"] == node_id), "?")
    shared = sum(n["NodeManagerAddress"] == ip for n in nodes) > 1
    return f"{ip}/{node_id[:6]}" if shared or ip == "?" else ip


def describe_placement(groups: list[RoleGroup]) -> str:
    """Where each role runs, for the start-up log and placement errors."""
    def shares(group: RoleGroup) -> str:
        others = [g.name for g in groups if g is not group and g.placement is group.placement]
        return f" (bundles shared with {', '.join(others)})" if others else ""

    return "; ".join(f"{g.name} x{len(g.actors)} on {', '.join(sorted(set(g.nodes())))}{shares(g)}"
                     for g in groups)


def wait(refs, what: str, timeout_s: float, on_ready=None):
    """ray.get with a deadline, failing fast: a role that hangs becomes an error naming the stage,
    and the first call that fails (its actor died, say) raises at once instead of after the
    others, which may be waiting on it in a collective. `on_ready(ref)` hears of each result."""
    pending = list(refs) if isinstance(refs, list) else [refs]
    deadline = time.monotonic() + timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RayRLHFError(f"{what} did not finish within {timeout_s:.0f} s (ray.call_timeout_s or "
                               "weight_sync.timeout_s); the actors' logs are in Ray's log directory")
        try:
            ray.get(ready)
        except ray.exceptions.RayTaskError as err:
            raise _dead_peer(pending) or err from None
        if on_ready is not None:
            on_ready(ready[0])
    return ray.get(refs)


def _dead_peer(pending: list, grace_s: float = 10.0) -> ray.exceptions.RayActorError | None:
    """The death of another call's actor, if one is reported within `grace_s`: when a rank dies in
    a collective, its peers' calls fail first ("connection reset by peer"), before Ray has seen the
    death that is the cause, and the cause is what the user must hear (a rank died: resume)."""
    deadline = time.monotonic() + grace_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError as death:
            return death
        except Exception:  # noqa: BLE001, S112 - another failure of the same event; the death is sought
            continue
    return None


class RoleClock:
    """Waits on calls to the roles (`timeout_s` unless told), adding up how long each role's work
    took: time/role/<role>_<call> in the metrics."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.seconds: dict[str, float] = {}

    def wait(self, refs, what: str, timeout_s: float | None = None):
        return wait(refs, what, timeout_s or self.timeout_s)

    def wait_roles(self, calls: dict[str, list], what: str, timeout_s: float | None = None
                   ) -> dict[str, list]:
        """The results of calls sent to several roles at once; adds to seconds[name] the time from
        now until the last of that role's calls finished."""
        start, owner = time.perf_counter(), {ref: name for name, refs in calls.items() for ref in refs}
        left = {name: len(refs) for name, refs in calls.items()}

        def finished(ref) -> None:
            left[owner[ref]] -= 1
            if not left[owner[ref]]:
                self.seconds[owner[ref]] = self.seconds.get(owner[ref], 0.0) + time.perf_counter() - start

        wait(list(owner), what, timeout_s or self.timeout_s, on_ready=finished)
        return {name: ray.get(refs) for name, refs in calls.items()}

    def take(self) -> dict[str, float]:
        """time/role/<role>_<call> since the last call."""
        seconds, self.seconds = self.seconds, {}
        return {f"time/role/{name}": value for name, value in seconds.items()}


def role_memory(groups: list[RoleGroup], timeout_s: float) -> dict[str, float]:
    """memory/<role>_rss_gib (and _cuda_peak_gib on GPU): the largest over the role's actors. An
    actor that died since its last call is left out: the next call to it handles its loss."""
    refs = {g.name: [a.__ray_call__.remote(_actor_memory) for a in g.actors] for g in groups}
    ray.wait([ref for group_refs in refs.values() for ref in group_refs],
             num_returns=sum(map(len, refs.values())), timeout=timeout_s)
    out: dict[str, float] = {}
    for name, group_refs in refs.items():
        for ref in group_refs:
            try:
                stats = ray.get(ref, timeout=0)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue
            for key, value in stats.items():
                out[f"memory/{name}_{key}"] = max(out.get(f"memory/{name}_{key}", 0.0), value)
    return out


def _actor_memory(actor) -> dict[str, float]:
    return process_memory()


def device_of(actor) -> tuple[str, tuple[str, ...]]:
    """(node id, GPU ids) of the actor: equal for actors that share a GPU."""
    return ray.get_runtime_context().get_node_id(), tuple(str(gpu) for gpu in ray.get_gpu_ids())
