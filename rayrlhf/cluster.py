"""Ray start-up and placement: each role is a group of actors on a placement group of its own."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrlhf.errors import RayRLHFError

PLACEMENT_TIMEOUT_S = 120


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


def reserve(name: str, bundles: list[dict[str, float]], strategy: str):
    """A ready placement group, or an error saying what could not be placed."""
    # Unique names: a driver may hold two groups of one role (a test comparing rank counts).
    placement = placement_group(bundles, strategy=strategy, name=f"rayrlhf-{name}-{uuid.uuid4().hex[:8]}")
    try:
        ray.get(placement.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(placement)
        raise RayRLHFError(f"cannot place {name}: it needs bundles {bundles} and the cluster has "
                           f"{ray.available_resources()} free") from None
    return placement


class RoleGroup:
    """`count` actors of `cls`, actor i on bundle i of a placement group: the role's own, one
    bundle of {cpus, gpus} per actor, or one it shares with colocated roles (`placement`)."""

    def __init__(self, name: str, cls: type, count: int, cpus: float, gpus: float, threads: int,
                 args: Callable[[int], tuple] = lambda rank: (), strategy: str = "PACK", placement=None):
        self.name = name
        self.owns_placement = placement is None
        self.placement = placement or reserve(f"role '{name}'", [bundle(cpus, gpus)] * count, strategy)
        self.actors: list[Any] = []
        self._remote_cls, self._args = ray.remote(cls), args
        self._options = {"num_cpus": cpus, "num_gpus": gpus,
                         "runtime_env": {"env_vars": actor_env(threads, gpus)}}
        self.actors = [self._start(rank) for rank in range(count)]

    def _start(self, rank: int):
        strategy = PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank)
        options = {"scheduling_strategy": strategy, **self._options}
        return self._remote_cls.options(**options).remote(*self._args(rank))

    def restart(self, rank: int) -> None:
        """A fresh actor for `rank` on its bundle, in place of one that died."""
        ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._start(rank)

    def find(self, actor_id: str) -> int | None:
        """The rank of the actor with this id (hex), if it is one of ours."""
        return next((i for i, a in enumerate(self.actors) if a._actor_id.hex() == actor_id), None)

    def nodes(self) -> list[str]:
        """The IP of the node holding each actor's bundle."""
        ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        bundles = ray.util.placement_group_table(self.placement)["bundles_to_node_id"]
        return [ips.get(bundles[i], "?") for i in range(len(self.actors))]

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
