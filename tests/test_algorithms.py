"""The PPO math against small hand-computed examples."""

import math

import torch

from rayrlhf import algorithms as alg

LN2 = math.log(2.0)


def test_response_logprobs_reads_the_logits_one_position_before_each_token():
    # P = 2 prompt columns, N = 2 response tokens [2, 0]. Logits at column 1 score token 2,
    # logits at column 2 score token 0; the other columns would give other answers.
    logits = torch.tensor([[[100.0, 0, 0], [0, 0, LN2], [LN2, 0, 0], [0, 100.0, 0]]])
    sequences = torch.tensor([[1, 1, 2, 0]])
    got = alg.response_logprobs(logits, sequences, prompt_len=2)
    assert torch.allclose(got, torch.tensor([[math.log(0.5), math.log(0.5)]]))


def test_response_logprobs_divides_by_temperature():
    logits = torch.tensor([[[0.0, 0, LN2], [0, 0, 0]]])
    got = alg.response_logprobs(logits, torch.tensor([[1, 2]]), prompt_len=1, temperature=2.0)
    # logits / 2 = [0, 0, ln 2 / 2] -> p(2) = sqrt2 / (2 + sqrt2)
    assert math.isclose(got.item(), math.log(math.sqrt(2) / (2 + math.sqrt(2))), rel_tol=1e-6)


def test_response_mask_stops_after_eos():
    responses = torch.zeros(2, 4, dtype=torch.long)
    mask = alg.response_mask(responses, torch.tensor([2, 3]))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_kl_penalty_and_score_on_last_valid_token():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = alg.kl_penalty(logprobs, ref) * mask  # [0.5, -1, 0]
    rewards = alg.token_rewards(torch.tensor([2.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1 + 2.0, 0.0]]))


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25]])
    mask = torch.ones(1, 2)
    adv, ret = alg.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # delta_1 = 1 - 0.25 = 0.75; delta_0 = 0 + 0.25 - 0.5 = -0.25; A_0 = -0.25 + 0.75
    assert torch.allclose(adv, torch.tensor([[0.5, 0.75]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0]]))
    adv, ret = alg.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # delta_0 = 0.9 * 0.25 - 0.5 = -0.275; A_0 = -0.275 + 0.45 * 0.75 = 0.0625
    assert torch.allclose(adv, torch.tensor([[0.0625, 0.75]]))
    assert torch.allclose(ret, torch.tensor([[0.5625, 1.0]]))


def test_gae_ignores_padding():
    adv, ret = alg.gae(torch.tensor([[1.0, 5.0]]), torch.tensor([[0.5, 9.0]]),
                       torch.tensor([[1.0, 0.0]]), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 0.0]]))


def test_whiten_uses_valid_tokens_only():
    out = alg.whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    s = math.sqrt(1.5)  # (x - 2) / sqrt(2/3)
    assert torch.allclose(out, torch.tensor([[-s, 0.0, s, 0.0]]), atol=1e-5)


def test_policy_loss_clips_the_ratio_pessimistically():
    logprobs = torch.full((1, 2), math.log(1.5))  # ratio 1.5 on both tokens
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = alg.policy_loss(logprobs, old, adv, torch.ones(1, 2), clip_eps=0.2)
    # token 0: min(1.5, 1.2) = 1.2; token 1: min(-1.5, -1.2) = -1.5; loss = -(1.2 - 1.5) / 2
    assert math.isclose(loss.item(), 0.15, rel_tol=1e-6)
    assert math.isclose(stats["clip_frac"].item(), 0.5)


def test_policy_loss_gradient_flows_only_through_unclipped_tokens():
    logprobs = torch.full((1, 2), math.log(1.5), requires_grad=True)
    loss, _ = alg.policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]),
                              torch.ones(1, 2), clip_eps=0.2)
    loss.backward()
    # d/dlogp of -(ratio * A)/2 = -ratio * A / 2 for the unclipped token only
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, 0.75]]))


def test_value_loss_takes_the_larger_of_clipped_and_unclipped():
    values, old, returns, mask = (torch.tensor([[1.0]]), torch.tensor([[0.0]]),
                                  torch.tensor([[2.0]]), torch.ones(1, 1))
    clipped, _ = alg.value_loss(values, old, returns, mask, clip_eps=0.2)
    assert math.isclose(clipped.item(), 0.5 * (0.2 - 2.0) ** 2, rel_tol=1e-6)
    plain, _ = alg.value_loss(values, old, returns, mask, clip_eps=None)
    assert math.isclose(plain.item(), 0.5, rel_tol=1e-6)


def test_masked_mean_skips_padding():
    assert alg.masked_mean(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])).item() == 2.0


def test_adaptive_kl_controller_moves_toward_target():
    ctl = alg.AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=2.0, n_steps=10)  # error clipped to +0.2 -> beta *= 1.02
    assert math.isclose(ctl.coef, 0.102)
    ctl.update(current_kl=0.5, n_steps=10)  # error -0.5 clipped to -0.2 -> beta *= 0.98
    assert math.isclose(ctl.coef, 0.102 * 0.98)
    fixed = alg.AdaptiveKLController(0.1, target=None, horizon=100)
    fixed.update(5.0, 10)
    assert fixed.coef == 0.1
