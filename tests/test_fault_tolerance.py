"""Actors that die mid-run: an engine is restarted and the run goes on; a trainer rank stops the
run promptly, naming the checkpoint to resume from. The processes are really killed (SIGKILL)."""

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
    it to ray::<Class>.<method> while a call runs) is `title`, i.e. one busy in that call."""

    def __init__(self, output_dir: Path, after_steps: int, title: str):
        super().__init__(daemon=True)
        self.output_dir, self.after_steps, self.title = output_dir, after_steps, title
        self.killed_at = None

    def run(self):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self.killed_at is None:
            if steps_logged(self.output_dir) >= self.after_steps:
                for proc in psutil.process_iter(["cmdline"]):
                    if " ".join(proc.info["cmdline"] or []).strip() == self.title:
                        proc.kill()
                        self.killed_at = time.monotonic()
                        break
            time.sleep(0.002)


def test_a_killed_engine_is_restarted_with_the_current_weights(tmp_path, ray_cluster, tiny_policy, capfd):
    cfg = small_config(tmp_path, tiny_policy, "rollout.num_engines=2", "trainer.total_steps=5")
    killer = Killer(Path(cfg.output_dir), 2, "ray::RolloutWorker.generate")
    killer.start()
    history = train(cfg)
    killer.join(timeout=1)
    assert killer.killed_at is not None, "the engine was never caught generating"
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5]
    assert "rollout engine(s) [" in capfd.readouterr().out
    # Every step after the restart sampled with the trained weights on both engines.
    assert all(m["sync/logprob_gap_mean"] < 1e-3 for m in history[2:]), history
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
