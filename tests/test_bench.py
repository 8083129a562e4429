"""`rayrlhf bench`: the per-stage report of a real short run, and the growth wording."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayrlhf.bench import compare, growth, run_bench
from rayrlhf.config import ConfigError, load_config
from rayrlhf.modeling import load_causal_lm


def point(prompts, length, samples, tokens, seconds):
    return {"prompts_per_step": prompts, "max_new_tokens": length, "samples_per_step": samples,
            "response_tokens_per_step": tokens, "seconds/step": seconds}


def test_growth_is_stated_in_words():
    words = growth([point(8, 16, 32, 512, 2.0), point(16, 16, 64, 1024, 4.1), point(8, 32, 32, 1024, 7.0)])
    assert words["prompts_per_step"].startswith("step time grows about linear with samples per step: x2.0")
    assert "worse than linear with response tokens per step" in words["max_new_tokens"]
    assert growth([point(8, 16, 32, 512, 2.0)]) == {}


def test_ours_against_trl_is_the_ratio_of_rates_and_of_each_pair_of_steps():
    ours = {"samples_per_s": 30.0, "seconds/each_step": [1.0, 1.2]}
    trl = {"trl/samples_per_s": 20.0, "trl/seconds/each_step": [1.5, 1.5]}
    assert compare(ours, trl) == {"ratio_vs_trl": 1.5, "ratio_vs_trl/each_step": [1.5, 1.25],
                                  "ratio_vs_trl/median_step": 1.375}
    assert compare(ours, {"trl/samples_per_s": None, "trl/error": "out of memory"}) == {"ratio_vs_trl": None}


def test_bench_refuses_trl_beside_asynchronous_rollouts(tmp_path):
    cfg = load_config("conf/bench_cpu.yaml", [f"output_dir={tmp_path}", "trainer.async_rollout=true",
                                                    "algorithm.tis_cap=2.0"])
    with pytest.raises(ConfigError, match="bench.trl"):
        run_bench(cfg)


@pytest.mark.integration
def test_bench_reports_every_stage_of_a_real_run(tmp_path, ray_cluster, tiny_policy):
    cfg = load_config("conf/bench_cpu.yaml", [
        f"model.path={tiny_policy}", "model.build_tiny=false", f"output_dir={tmp_path}",
        "bench.steps=2", "bench.warmup_steps=1", "bench.sweep_prompts=[]", "bench.sweep_max_new_tokens=[]",
        # What is tested is the report, not the compiled engine and trainer layers (their own tests).
        "rollout.enforce_eager=true", "actor.compile=false"])
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
    assert base["seconds/step"] == pytest.approx(sum(base["seconds/each_step"]) / 2)
    # TRL is optional: either it ran on the same point, a step after each of ours, or the report
    # says why not.
    if report["trl/samples_per_s"] is None:
        assert "pip install trl" in report["trl/error"] and report["ratio_vs_trl"] is None
    else:
        trl_steps = report["trl/seconds/each_step"]
        assert len(trl_steps) == 2 and report["trl/samples_per_s"] == pytest.approx(2 * 32 / sum(trl_steps))
        assert report["ratio_vs_trl"] == pytest.approx(base["samples_per_s"] / report["trl/samples_per_s"])
        assert report["ratio_vs_trl/each_step"] == pytest.approx(
            [theirs / ours for ours, theirs in zip(base["seconds/each_step"], trl_steps, strict=True)])
    assert json.loads((tmp_path / "bench.json").read_text())["points"][0]["point"] == "base"
    assert [r["point"] for r in csv.DictReader((tmp_path / "bench.csv").open())] == ["base"]
    assert Path(tmp_path / "bench.png").stat().st_size > 10_000


def test_train_layouts_benchmark_times_each_layout_on_real_trainer_ranks(tmp_path, tiny_policy):
    """benchmarks/train_layouts.py: the layouts of one GRPO batch on real DeepSpeed ranks (an
    eager one, and a compiled one for shared+compiled); sharing prompts computes fewer positions
    than packing, which computes fewer than padding. oneDNN's linear layers are forced (as `auto`
    picks them on AMD CPUs), so the compiled rank runs them beside torch.compile on any CPU."""
    out = tmp_path / "layouts.json"
    overrides = [f"model.path={tiny_policy}", "model.build_tiny=false", "model.linear_backend=onednn",
                 "trainer.prompts_per_step=4",
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
    assert result["products_alone"]["backend"] == "onednn" and 0 < result["shared_products_share"] < 1


def test_weight_load_benchmark_times_both_loads_on_a_real_engine(tmp_path, tiny_policy):
    """benchmarks/weight_load.py: vLLM's reload and the in-place load, alternating on one engine."""
    out = tmp_path / "weight_load.json"
    subprocess.run([sys.executable, "benchmarks/weight_load.py", "--config", "conf/bench_cpu.yaml",
                    "--rounds", "2", "--output", str(out), f"model.path={tiny_policy}",
                    # An eager engine: test_weight_sync loads a compiled one in place.
                    "model.build_tiny=false", "rollout.enforce_eager=true"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "."})
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == {"vllm_reload_weights", "in_place", "memcpy"}
    assert all(ms > 0 for ms in result["median_ms"].values())
    assert result["bytes"] == sum(p.numel() * 4 for p in load_causal_lm(tiny_policy, "float32").parameters())


def test_logprob_path_benchmark_times_each_path_against_the_products(tmp_path, realistic_models):
    """benchmarks/logprob_path.py on a 131k-token head: every path and the products alone, timed."""
    out = tmp_path / "logprob_path.json"
    subprocess.run([sys.executable, "benchmarks/logprob_path.py", "--config", "conf/bench_cpu_131k.yaml",
                    "--rounds", "2", "--tokens", "70", "--output", str(out),
                    f"model.path={realistic_models('qwen2')}", "model.build_tiny=false"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "."})
    result = json.loads(out.read_text())
    assert (result["tokens"], result["vocab"]) == (70, 131072)
    assert 70 > result["chunk_positions"]  # more than one chunk: the recompute runs
    assert set(result["median_s"]) == {"fused", "autograd_chunks", "full_logits", "products_alone"}
    assert all(s > 0 for s in result["median_s"].values())
