"""`rayrlhf bench`: the per-stage report of a real short run, and the growth wording."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayrlhf.bench import growth, mean_trl, run_bench
from rayrlhf.config import load_config
from rayrlhf.modeling import load_causal_lm


def point(prompts, length, samples, tokens, seconds):
    return {"prompts_per_step": prompts, "max_new_tokens": length, "samples_per_step": samples,
            "response_tokens_per_step": tokens, "seconds/step": seconds}


def test_growth_is_stated_in_words():
    words = growth([point(8, 16, 32, 512, 2.0), point(16, 16, 64, 1024, 4.1), point(8, 32, 32, 1024, 7.0)])
    assert words["prompts_per_step"].startswith("step time grows about linear with samples per step: x2.0")
    assert "worse than linear with response tokens per step" in words["max_new_tokens"]
    assert growth([point(8, 16, 32, 512, 2.0)]) == {}


def test_trl_rate_is_the_mean_of_the_runs_around_ours_or_says_why_there_is_none():
    run = {"trl/samples_per_s": 10.0, "trl/version": "1"}
    mean = mean_trl([run, run | {"trl/samples_per_s": 14.0}])
    assert mean["trl/samples_per_s"] == 12.0 and mean["trl/samples_per_s_runs"] == [10.0, 14.0]
    failed = {"trl/samples_per_s": None, "trl/error": "out of memory"}
    assert mean_trl([run, failed]) == failed and mean_trl([failed]) == failed
    assert mean_trl([]) == {"trl/samples_per_s": None}


@pytest.mark.integration
def test_bench_reports_every_stage_of_a_real_run(tmp_path, ray_cluster, tiny_policy):
    cfg = load_config("conf/bench_cpu.yaml", [
        f"model.path={tiny_policy}", "model.build_tiny=false", f"output_dir={tmp_path}",
        "bench.steps=2", "bench.warmup_steps=1", "bench.sweep_prompts=[]", "bench.sweep_max_new_tokens=[]",
        "rollout.enforce_eager=true"])  # what is tested is the report, not the compiled engine
    report = run_bench(cfg)
    base = report["points"][0]
    stages = ("generate", "experience", "train", "weight_sync", "other")
    assert abs(sum(base[f"seconds/{s}"] for s in stages) - base["seconds/step"]) < 1e-6
    assert all(base[f"seconds/{s}"] > 0 for s in stages[:-1])
    assert base["samples_per_step"] == 32
    assert base["samples_per_s"] == pytest.approx(32 / base["seconds/step"])
    assert 0 <= report["unattributed_frac"] < 0.2
    assert report["weight_sync"]["bytes"] > 0 and report["weight_sync"]["times_memcpy"] > 1
    assert base["train/mfu"] is None and base["train/tflops_per_s"] > 0  # no peak figure on CPU
    # TRL is optional: either it ran on the same point, before and after ours (its rate is the
    # mean of the two), or the report says why not.
    if report["trl/samples_per_s"] is None:
        assert "pip install trl" in report["trl/error"] and report["ratio_vs_trl"] is None
    else:
        runs = report["trl/samples_per_s_runs"]
        assert len(runs) == 2 and report["trl/samples_per_s"] == pytest.approx(sum(runs) / 2)
        ours_over_trl = base["samples_per_s"] / report["trl/samples_per_s"]
        assert report["ratio_vs_trl"] == pytest.approx(ours_over_trl)
    assert json.loads((tmp_path / "bench.json").read_text())["points"][0]["point"] == "base"
    assert [r["point"] for r in csv.DictReader((tmp_path / "bench.csv").open())] == ["base"]
    assert Path(tmp_path / "bench.png").stat().st_size > 10_000


def test_train_layouts_benchmark_times_each_layout_on_real_trainer_ranks(tmp_path, tiny_policy):
    """benchmarks/train_layouts.py: the layouts of one GRPO batch on real DeepSpeed ranks (an
    eager one, and a compiled one for shared+compiled); sharing prompts computes fewer positions
    than packing, which computes fewer than padding."""
    out = tmp_path / "layouts.json"
    overrides = [f"model.path={tiny_policy}", "model.build_tiny=false", "trainer.prompts_per_step=4",
                 "algorithm.train_batch_size=16", "actor.micro_batch_size=16"]
    subprocess.run([sys.executable, "benchmarks/train_layouts.py", "--config", "conf/bench_cpu.yaml",
                    "--rounds", "2", "--output", str(out), *overrides],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "."})
    result = json.loads(out.read_text())
    positions = result["positions_per_batch"]
    assert positions["shared"] < positions["packed"] < positions["padded"]
    assert set(result["train_seconds_median"]) == {"padded", "packed", "shared", "shared+checkpointing",
                                                   "shared+onednn_linear", "shared+torch_linear",
                                                   "shared+compiled"}
    assert all(seconds > 0 for seconds in result["train_seconds_median"].values())
    assert result["train_ratio_to_padded"]["padded"] == 1.0
    assert all(seconds > 0 for seconds in result["optimizer_step"].values())


def test_weight_load_benchmark_times_both_loads_on_a_real_engine(tmp_path, tiny_policy):
    """benchmarks/weight_load.py: vLLM's reload and the in-place load, alternating on one engine."""
    out = tmp_path / "weight_load.json"
    subprocess.run([sys.executable, "benchmarks/weight_load.py", "--config", "conf/bench_cpu.yaml",
                    "--rounds", "2", "--output", str(out), f"model.path={tiny_policy}",
                    "model.build_tiny=false"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "."})
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == {"vllm_reload_weights", "in_place", "memcpy"}
    assert all(ms > 0 for ms in result["median_ms"].values())
    assert result["bytes"] == sum(p.numel() * 4 for p in load_causal_lm(tiny_policy, "float32").parameters())
