"""Data-parallel DeepSpeed ranks (real Ray actors, gloo): a minibatch's loss and gradient do not
depend on how many ranks share it or how it is cut into micro-batches, and every rank runs the
same collectives in evaluation."""

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from rayrlhf.algorithms import Sampling, policy_loss, preference_loss, response_mask, value_loss
from rayrlhf.batch import build_batch
from rayrlhf.cluster import wait
from rayrlhf.config import load_config
from rayrlhf.data import preference_batch, sft_batch
from rayrlhf.modeling import (
    load_causal_lm,
    load_scalar_model,
    policy_logprobs,
    sft_token_logprobs,
    token_values,
)
from rayrlhf.supervised import held_out_metrics
from rayrlhf.system import trainer_group

pytestmark = pytest.mark.integration
# The functions below run inside the trainer actors (actor.__ray_call__), which cannot import tests.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def ppo_batch():
    """Two samples of six tokens, then two of one: split over two ranks, one rank holds 12 response
    tokens and the other 2, so a per-rank token mean would weigh a short response's token 6x."""
    batch = build_batch([[5, 6, 7]] * 4, [[11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22], [23], [24]], 0)
    batch["mask"] = response_mask(batch["sequences"][:, batch.prompt_len:], batch["response_lengths"])
    generator = torch.Generator().manual_seed(0)
    for key in ("engine_logprobs", "advantages", "old_values", "returns"):
        batch[key] = torch.randn(batch["mask"].shape, generator=generator)
    batch["engine_logprobs"] = -batch["engine_logprobs"].abs()
    return batch


# (prompt, chosen, rejected) of uneven lengths.
PAIRS = [([5, 6], [7, 8, 9, 2], [7, 2]), ([12], [13, 2], [14, 15, 16, 17, 2]),
         ([18, 19, 20], [21, 2], [22, 2]), ([23], [24, 25, 26, 2], [27, 2]),
         ([28, 29], [30, 31, 2], [32, 33, 34, 2])]


def pairs_batch(count=4):
    """Preference pairs with made-up reference log-probs."""
    batch = preference_batch(PAIRS[:count], pad_id=0)
    batch["ref_logps"] = -torch.rand(count, 2, generator=torch.Generator().manual_seed(1)) * 10
    return batch


def pair_logps(model, pairs):
    """[pairs, 2] summed log-probs of each pair's responses, each sequence scored on its own."""
    flat = build_batch([p for p, *_ in pairs for _ in range(2)], [r for _, *pair in pairs for r in pair], 0)
    return policy_logprobs(model, flat, Sampling()).sum(1).view(-1, 2)


def supervised_batch():
    return sft_batch([[([5, 6], [7, 8, 9, 10, 11, 2])], [([12], [13, 14, 15, 16, 17, 2])], [([18, 19], [2])],
                      [([20], [21, 2])]], pad_id=0)


def capture_gradients(worker, method, *args):
    """Runs `method` on a trainer worker and returns the full gradients DeepSpeed hands the
    optimizer (averaged over the ranks, gathered from ZeRO-3 partitions), leaving the optimizer
    step itself out. Runs on every rank of a group (the ZeRO-3 gather is collective)."""
    from deepspeed.utils import safe_get_full_grad

    grads = {}

    def take_model_step(*_, **__):
        for name, param in worker.module.named_parameters():
            grads[name] = safe_get_full_grad(param).detach().clone()
        # What the real step ends with: the ZeRO optimizer's own zero_grad resets its partitions (the
        # engine's alone left them to add up into the next call's gradients).
        worker.engine.optimizer.zero_grad()

    worker.engine._take_model_step = take_model_step
    getattr(worker, method)(*args)
    return grads


def setup_kwargs(role, cfg):
    return {} if role in ("sft", "dpo") else {"algo_cfg": cfg.algorithm, "norm_len": 6}


@pytest.fixture(scope="module")
def trainers(ray_cluster, tiny_policy):
    """(config, role -> two ZeRO-3 ranks as Ray actors, in micro-batches of one row), set up at once."""
    cfg = load_config("conf/tiny_ppo.yaml", [
        f"model.path={tiny_policy}", "trainer.prompts_per_step=4", "algorithm.train_batch_size=4",
        "algorithm.ppo_epochs=1", "rollout.max_new_tokens=6", "actor.micro_batch_size=1",
        "critic.micro_batch_size=1"])
    roles = ("actor", "critic", "sft", "dpo")

    def start(role):
        role_cfg = cfg[role].copy()
        role_cfg.num_ranks, role_cfg.zero_stage, role_cfg.micro_batch_size = 2, 3, 1
        return trainer_group(role, role_cfg, tiny_policy, 4, cfg, **setup_kwargs(role, cfg))

    with ThreadPoolExecutor(len(roles)) as pool:
        groups = dict(zip(roles, pool.map(start, roles), strict=True))
    yield cfg, groups
    for group in groups.values():
        group.shutdown()


def minibatch_gradients(role, batch, cfg, model_path):
    """The reference: the gradient of the whole minibatch's loss, in one piece, without DeepSpeed
    (the models start as the trainers' do: the seed, then the checkpoint, then a new head)."""
    torch.manual_seed(cfg.seed)
    model = (load_scalar_model if role == "critic" else load_causal_lm)(model_path, "float32")
    if role == "sft":
        nll = -sft_token_logprobs(model, batch).sum()
        loss = nll / batch["loss_mask"][:, 1:].sum()
    elif role == "dpo":
        loss, _ = preference_loss(pair_logps(model, PAIRS[:len(batch)]), batch["response_lengths"],
                                  batch["ref_logps"], "sigmoid", cfg.dpo.beta)
    elif role == "actor":
        algo = cfg.algorithm
        logprobs = policy_logprobs(model, batch, Sampling.of(cfg.rollout))
        old = batch["old_logprobs"] if "old_logprobs" in batch.tensors else logprobs.detach()
        loss, _ = policy_loss(logprobs, old, batch["advantages"], batch["mask"], algo.clip_eps,
                              algo.clip_eps_high, kind=algo.policy_loss, ratio_level=algo.ratio_level)
    else:
        loss, _ = value_loss(token_values(model, batch), batch["old_values"], batch["returns"], batch["mask"],
                             cfg.algorithm.value_clip_eps)
    loss.backward()
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize("role", ["actor", "critic", "sft", "dpo"])
def test_a_minibatch_has_the_same_gradient_on_two_ranks_as_in_one_piece(trainers, tiny_policy, role):
    """Token-mean losses (actor, critic, SFT) and DPO's mean over pairs: each token (pair) weighs
    the same whichever rank holds it, in micro-batches of one row, under ZeRO-3 (whose micro-batch
    gradients must add up)."""
    cfg, groups = trainers
    batch = {"sft": supervised_batch, "dpo": pairs_batch}.get(role, ppo_batch)()
    assert_same_gradients(groups[role], role, batch, cfg, tiny_policy)


def assert_same_gradients(group, role, batch, cfg, model_path):
    # PPO's train takes a seed and a KL coefficient.
    method, extra = ("train", (0, 0.0)) if role in ("actor", "critic") else ("train_step", ())
    expected = minibatch_gradients(role, batch, cfg, model_path)
    two = wait([actor.__ray_call__.remote(capture_gradients, method, part, *extra)
                for actor, part in zip(group.actors, batch.chunks(2), strict=True)], method, 300)[0]
    assert expected.keys() == two.keys() and any(g.abs().sum() > 0 for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(two[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("policy_loss, ratio_level", [("ppo", "sequence"), ("cispo", "token")])
def test_gspo_and_cispo_gradients_on_two_ranks(trainers, tiny_policy, policy_loss, ratio_level):
    """GSPO's sequence-level ratio (clipped per response) and CISPO's clipped weights: with old
    log-probs of their own (ratios about exp(+-0.3), some outside [0.8, 1.28]), the trainer's
    gradient on two ZeRO-3 ranks is the loss's on the whole minibatch."""
    cfg, groups = trainers
    cfg = cfg.copy()
    changes = {"policy_loss": policy_loss, "ratio_level": ratio_level, "clip_eps_high": 0.28}
    cfg.algorithm.update(changes)
    batch = ppo_batch()
    noise = torch.randn(batch["mask"].shape, generator=torch.Generator().manual_seed(2))
    batch["old_logprobs"] = (-torch.tensor(57.0).log() + 0.3 * noise) * batch["mask"]
    group = groups["actor"]
    wait(group.call("__ray_call__", set_algorithm, changes), "loss settings", 60)
    try:
        assert_same_gradients(group, "actor", batch, cfg, tiny_policy)
    finally:
        wait(group.call("__ray_call__", set_algorithm, {"policy_loss": "ppo", "ratio_level": "token",
                                                        "clip_eps_high": None}), "loss settings", 60)


def set_algorithm(worker, changes):
    worker.objective.algo.update(changes)


def test_zero3_evaluation_with_shares_a_micro_batch_apart(trainers, tiny_policy):
    """33 held-out rows over two ZeRO-3 ranks in micro-batches of 16: 17 and 16 rows, so two forwards
    on one rank and one on the other; each forward gathers the weights from both ranks."""
    group = trainers[1]["sft"]
    wait(group.call("__ray_call__", set_micro_batch_size, 16), "micro-batch size", 60)
    examples = [[([5 + i % 7, 6], [7 + i % 11, 8, 2][: 1 + i % 3])] for i in range(33)]
    batch = sft_batch(examples, pad_id=0)
    metrics = held_out_metrics("sft", group, batch, timeout_s=120)
    with torch.no_grad():
        nll = -sft_token_logprobs(load_causal_lm(tiny_policy, "float32"), batch).sum()
    expected = nll / batch["loss_mask"][:, 1:].sum()
    assert metrics["eval/loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_zero3_reference_pass_with_shares_a_micro_batch_apart(trainers, tiny_policy):
    """DPO's reference log-probs of 5 pairs over two ZeRO-3 ranks in micro-batches of 2: 2 and 3
    pairs, so one forward on one rank and two on the other, each gathering the weights from both."""
    group = trainers[1]["dpo"]
    wait(group.call("__ray_call__", set_micro_batch_size, 2), "micro-batch size", 60)
    try:
        batch = preference_batch(PAIRS, pad_id=0)
        got = torch.cat(wait(group.scatter("infer", [(b,) for b in batch.chunks(2)]), "reference pass", 120))
    finally:
        wait(group.call("__ray_call__", set_micro_batch_size, 1), "micro-batch size", 60)
    with torch.no_grad():
        expected = pair_logps(load_causal_lm(tiny_policy, "float32"), PAIRS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def set_micro_batch_size(worker, size):
    worker.cfg.micro_batch_size = size
