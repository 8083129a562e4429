import json
import math
import sys

import pytest
from omegaconf import OmegaConf

from rayrlhf.errors import RayRLHFError
from rayrlhf.metrics import MetricsLog, process_memory


def logging_cfg(tensorboard=False, wandb=False, mode="offline"):
    return OmegaConf.create({"tensorboard": tensorboard, "wandb": wandb, "wandb_project": "rayrlhf-test",
                             "wandb_mode": mode})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_records_and_non_finite_values(tmp_path):
    log = MetricsLog(tmp_path, total_steps=2)
    log.log({"step": 1, "reward/mean": 0.5, "kl/mean": float("nan")})
    log.log({"step": 2, "reward/mean": 0.75, "throughput/tokens_per_s": float("inf")})
    log.close()
    first, second = read_jsonl(tmp_path / "metrics.jsonl")
    assert first["step"] == 1 and first["reward/mean"] == 0.5 and math.isnan(first["kl/mean"])
    assert second == {"step": 2, "reward/mean": 0.75, "throughput/tokens_per_s": math.inf}


def test_resume_keeps_earlier_steps(tmp_path):
    log = MetricsLog(tmp_path, total_steps=3)
    for step in (1, 2, 3):
        log.log({"step": step, "reward/mean": float(step)})
    log.close()
    # The run crashed after step 3 but its last checkpoint was step 1, so it resumes at 2.
    log = MetricsLog(tmp_path, total_steps=3, first_step=2)
    assert log.bar.n == 1
    log.log({"step": 2, "reward/mean": 20.0})
    log.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward/mean"]) for r in records] == [(1, 1.0), (2, 20.0)]


def test_progress_bar_postfix_and_advance(tmp_path):
    log = MetricsLog(tmp_path, total_steps=3)
    log.log({"step": 0, "eval/reward": 0.1}, advance=False)  # pre-training evaluation
    assert log.bar.n == 0
    # Keys absent from a record are left out of the postfix instead of raising.
    log.log({"step": 1, "reward/mean": 0.25, "throughput/tokens_per_s": 1234.6})
    assert log.bar.n == 1
    assert "reward=0.250" in log.bar.postfix and "tok_s=1235" in log.bar.postfix
    assert "kl=" not in log.bar.postfix
    log.log({"step": 2})
    log.close()


def test_custom_name_and_progress(tmp_path):
    log = MetricsLog(tmp_path, total_steps=2, name="sft", progress={"loss": "train/loss"})
    log.log({"step": 1, "train/loss": 0.5, "reward/mean": 1.0})
    assert log.bar.desc.startswith("sft")
    assert log.bar.postfix == "loss=0.500"
    log.close()


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, total_steps=2, logging_cfg=logging_cfg(tensorboard=True))
    log.log({"step": 0, "eval/reward": 0.1}, advance=False)
    log.log({"step": 1, "reward/mean": 0.5, "kl/mean": float("nan"), "note": "text is skipped"})
    log.log({"step": 2, "reward/mean": 0.75, "kl/mean": 0.25})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"eval/reward", "reward/mean", "kl/mean"}
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]
    assert [e.step for e in events.Scalars("eval/reward")] == [0]
    kl = events.Scalars("kl/mean")
    assert math.isnan(kl[0].value) and kl[1].value == 0.25


def test_tensorboard_resume_drops_replaced_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, total_steps=3, logging_cfg=logging_cfg(tensorboard=True))
    for step in (1, 2, 3):
        log.log({"step": step, "reward/mean": float(step)})
    log.close()
    log = MetricsLog(tmp_path, total_steps=3, first_step=2, logging_cfg=logging_cfg(tensorboard=True))
    log.log({"step": 2, "reward/mean": 20.0})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 1.0), (2, 20.0)]


def test_wandb_offline_without_network(tmp_path, monkeypatch):
    import wandb

    # Any attempt to reach a server would go to a closed local port; settings stay inside tmp_path.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    out = tmp_path / "run-7"
    out.mkdir()
    log = MetricsLog(out, total_steps=2, logging_cfg=logging_cfg(wandb=True), config={"lr": 1e-6})
    assert log.run.name == "run-7" and log.run.config["lr"] == 1e-6
    log.log({"step": 0, "eval/reward": 0.125}, advance=False)
    log.log({"step": 1, "reward/mean": 0.5, "kl/mean": float("nan")})
    log.log({"step": 2, "reward/mean": 1.375, "kl/mean": float("inf")})
    log.close()
    assert wandb.run is None  # close() finished the run
    # finish() only tells wandb's service process the run is over; that process closes the record
    # file on its own time. Teardown waits for it, as a driver's exit does.
    wandb.teardown()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (record_file,) = run_dir.glob("run-*.wandb")
    # History rows are stored as JSON text inside the protobuf records.
    records = record_file.read_bytes()
    for needle in (b"eval/reward", b"0.125", b"reward/mean", b"1.375", b"kl/mean"):
        assert needle in records


def test_wandb_missing_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(RayRLHFError, match="pip install wandb"):
        MetricsLog(tmp_path, total_steps=1, logging_cfg=logging_cfg(wandb=True))


def test_process_memory():
    import torch

    memory = process_memory()
    assert memory["rss_gib"] > 0
    assert ("cuda_peak_gib" in memory) == torch.cuda.is_available()
