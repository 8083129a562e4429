"""actor.compile: the trainer's compiled layers train exactly as the eager ones do, with either
linear backend (forced, so that CI on any CPU vendor runs both: `auto` picks oneDNN on AMD only)."""

import pytest
import torch

from rayrlhf.algorithms import response_mask
from rayrlhf.batch import build_batch
from rayrlhf.config import load_config
from rayrlhf.modeling import load_causal_lm
from rayrlhf.trainer import TrainerWorker, free_port


def _grpo_batch():
    # Two prompts with three responses each, of uneven lengths (packed rows of shared prompts).
    prompts = [[5, 6, 7, 8]] * 3 + [[9, 10]] * 3
    responses = [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21], [22, 23, 24, 25], [26]]
    batch = build_batch(prompts, responses, pad_id=0)
    batch["mask"] = response_mask(batch["sequences"][:, batch.prompt_len:], batch["response_lengths"])
    generator = torch.Generator().manual_seed(0)
    batch["engine_logprobs"] = -torch.rand(batch["mask"].shape, generator=generator)
    batch["advantages"] = torch.randn(batch["mask"].shape, generator=generator)
    return batch


def _worker(model_path: str, compile_: bool, linear_backend: str = "torch") -> TrainerWorker:
    overrides = [f"model.path={model_path}", "trainer.prompts_per_step=2", "rollout.n=3",
                 f"model.linear_backend={linear_backend}",
                 "algorithm.train_batch_size=6", "algorithm.ppo_epochs=1", "actor.micro_batch_size=6",
                 "critic.micro_batch_size=6",
                 "actor.zero_stage=0", "actor.packing=true", f"actor.compile={compile_}"]
    cfg = load_config("conf/tiny_grpo.yaml", overrides)
    worker = TrainerWorker("actor", 0, 1)
    worker.setup("127.0.0.1", free_port("127.0.0.1"), model_path, cfg.actor, 6, cfg.model, seed=0,
                 algo_cfg=cfg.algorithm, norm_len=cfg.rollout.max_new_tokens)
    return worker


def _train(worker: TrainerWorker) -> list[dict]:
    return [worker.train(_grpo_batch(), seed=step, kl_coef=0.0)[0] for step in range(2)]


@pytest.fixture(scope="module")
def eager_actor(tiny_policy):
    eager = _worker(tiny_policy, False)
    return eager, _train(eager)


@pytest.mark.parametrize("linear_backend", ["torch", "onednn"])
def test_compiled_actor_takes_the_eager_actors_steps(tiny_policy, eager_actor, linear_backend):
    """With either backend the compiled layers take the eager steps; with oneDNN's, its products
    stay oneDNN's inside the compiled graphs (a custom op, which inductor calls as it is)."""
    eager, eager_stats = eager_actor
    graphs = torch._dynamo.utils.counters["stats"]
    graphs.clear()
    compiled = _worker(tiny_policy, True, linear_backend)
    compiled_at_setup = graphs["unique_graphs"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        compiled_stats = _train(compiled)
    onednn_calls = sum(e.count for e in profile.key_averages() if e.key == "rayrlhf::onednn_linear")
    # The forward and both backward products of each block's linear layers, at each of the 2 steps
    # (the LM head is the fused log-prob path's own).
    layers = sum(isinstance(m, torch.nn.Linear) for m in compiled.module.model.layers.modules())
    assert onednn_calls == (2 * 3 * layers if linear_backend == "onednn" else 0)
    # Set-up compiled what training runs: nothing was compiled again at the first steps.
    assert compiled_at_setup >= 1 and graphs["unique_graphs"] == compiled_at_setup
    for got, expected in zip(compiled_stats, eager_stats, strict=True):
        assert got.keys() == expected.keys()
        for key in expected:
            assert abs(got[key] - expected[key]) < 1e-5, key
    # Equal up to rounding: the two differ by far less than either moved from the start (fused
    # kernels sum in another order, and Adam magnifies that where a gradient is near zero).
    start = dict(load_causal_lm(tiny_policy, "float32").named_parameters())
    for (name, got), (_, expected) in zip(compiled.module.named_parameters(), eager.module.named_parameters(),
                                          strict=True):
        moved = (expected - start[name]).norm()
        assert moved > 0 and (got - expected).norm() < 1e-3 * moved, name
