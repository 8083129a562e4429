"""Actors that die mid-run: an engine is restarted and the run goes on; a trainer rank stops the
run promptly, naming the checkpoint to resume from. The processes are really killed (SIGKILL)."""

import math
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_integration import small_config, wait_for_resources_released

from rayrlhf.driver import train
from rayrlhf.errors import RayRLHFError

pytestmark = pytest.mark.integration


def steps_logged(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return len([line for line in path.read_text().splitlines() if line]) if path.exists() else 0


class Killer(threading.Thread):
    """Once `after_steps` iterations are logged, SIGKILLs the first process whose title (Ray sets
    it to ray::<Class>.<method> while a call runs, ray::<Class> while idle) is `title`, i.e. one busy
    in that call, or idle; with `during`, only while a process titled `during` runs."""

    def __init__(self, output_dir: Path, after_steps: int, title: str, during: str | None = None):
        super().__init__(daemon=True)
        self.output_dir, self.after_steps, self.title, self.during = output_dir, after_steps, title, during
        self.killed_at = None

    def run(self):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self.killed_at is None:
            if steps_logged(self.output_dir) >= self.after_steps:
                titles = {proc: " ".join(proc.info["cmdline"] or []).strip()
                          for proc in psutil.process_iter(["cmdline"])}
                if self.during is None or self.during in titles.values():
                    victim = next((proc for proc, title in titles.items() if title == self.title), None)
                    if victim is not None:
                        victim.kill()
                        self.killed_at = time.monotonic()
            time.sleep(0.002)


def test_an_engine_dead_at_a_collective_sync_is_restarted_without_hanging(tmp_path, ray_cluster, tiny_policy,
                                                                            capfd):
    """The gloo broadcast to a dead engine only ends at the group's timeout: trainer rank 0 must not
    wait in it (it broadcasts from a thread of its own), nor the other ZeRO-3 rank in the next
    gather, nor the live engine, stuck in the same broadcast (it is restarted too)."""
    cfg = small_config(tmp_path, tiny_policy, "rollout.num_engines=2", "trainer.total_steps=4",
                       "weight_sync.transport=collective", "actor.num_ranks=2", "actor.zero_stage=3",
                       "weight_sync.timeout_s=300", "ray.call_timeout_s=300")
    # An idle engine is killed while the actor trains: the sync right after meets it dead.
    killer = Killer(Path(cfg.output_dir), 1, "ray::VLLMEngine", during="ray::TrainerWorker.train")
    killer.start()
    history = train(cfg)
    finished = time.monotonic()
    killer.join(timeout=1)
    assert killer.killed_at is not None, "no idle engine was caught while the actor trained"
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert "rollout engine(s) [" in capfd.readouterr().out
    # Waiting in the broadcast to the dead engine would last the group's whole timeout (300 s).
    assert finished - killer.killed_at < 200
    # The steps after the restart sampled with the trained weights on both engines.
    assert all(m["sync/logprob_gap_mean"] < 1e-3 for m in history[2:]), history
    assert wait_for_resources_released(ray_cluster)


def test_asynchronous_engines_run_ahead_and_a_killed_one_loses_no_batch(tmp_path, ray_cluster, tiny_policy,
                                                                        capfd):
    """Two batches ahead: the sync after a step does not wait for the generations queued before it
    (the engines are still generating when it returns), and an engine killed with several
    generations queued is restarted and every one of them is sent again."""
    cfg = small_config(tmp_path, tiny_policy, "rollout.num_engines=2", "trainer.total_steps=6",
                       "trainer.async_rollout=true", "trainer.max_staleness=2", "algorithm.tis_cap=2.0",
                       "algorithm.estimator=rloo", "rollout.n=4", "algorithm.kl_coef=0",
                       "algorithm.ppo_epochs=1", "algorithm.train_batch_size=64", "actor.micro_batch_size=64",
                       "rollout.max_new_tokens=48", "data.max_prompt_tokens=16")
    killer = Killer(Path(cfg.output_dir), 2, "ray::VLLMEngine.generate")
    killer.start()
    history = train(cfg)
    killer.join(timeout=1)
    assert killer.killed_at is not None, "the engine was never caught generating"
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert "rollout engine(s) [" in capfd.readouterr().out
    assert all(m["rollout/staleness"] <= 2 for m in history)
    # With no drain at the syncs, the engines are still generating when some sync returns (which
    # ones depends on the machine's speed: the first training step is slow, and a batch can finish
    # within a short step); a sync that waited for the queued generations would leave 0 every time.
    assert any(m["rollout/generating_at_sync"] > 0 for m in history), history
    assert all(math.isfinite(m["loss/policy"]) for m in history)
    assert wait_for_resources_released(ray_cluster)


def test_a_killed_trainer_rank_stops_the_run_naming_the_checkpoint(tmp_path, ray_cluster, tiny_policy):
    cfg = small_config(tmp_path, tiny_policy, "actor.num_ranks=2", "trainer.total_steps=100",
                       "trainer.checkpoint_every=1")
    killer = Killer(Path(cfg.output_dir), 2, "ray::TrainerWorker.train")
    killer.start()
    died = r"(actor|critic) rank \d died .* resume from .*checkpoints/step_0000\d\d with resume=true"
    with pytest.raises(RayRLHFError, match=died) as err:
        train(cfg)
    stopped_at = time.monotonic()
    assert killer.killed_at is not None, str(err.value)
    assert stopped_at - killer.killed_at < 60
    assert steps_logged(Path(cfg.output_dir)) < 100
    assert wait_for_resources_released(ray_cluster)
