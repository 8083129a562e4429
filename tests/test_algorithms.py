"""The PPO math against small hand-computed examples."""

import math

import pytest
import torch

from rayrlhf import algorithms as alg
from rayrlhf.batch import build_batch

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
    got = alg.response_logprobs(logits, torch.tensor([[1, 2]]), prompt_len=1,
                                sampling=alg.Sampling(temperature=2.0))
    # logits / 2 = [0, 0, ln 2 / 2] -> p(2) = sqrt2 / (2 + sqrt2)
    assert math.isclose(got.item(), math.log(math.sqrt(2) / (2 + math.sqrt(2))), rel_tol=1e-6)


def test_sampling_distribution_top_k_top_p_and_repetition_penalty():
    """The trainer's log-probs are those of the distribution vLLM samples from."""
    tokens = torch.tensor([[0]])
    top_k = alg.sampling_logits(torch.tensor([[[3.0, 2.0, 1.0, 0.0]]]), tokens, alg.Sampling(top_k=2))
    expected = 3 - math.log(math.e**3 + math.e**2)
    assert torch.allclose(alg.token_logprobs(top_k, tokens), torch.tensor([[expected]]))
    # p = [.5, .25, .125, .125]: top_p 0.7 keeps the smallest set from the top holding 0.7 -> {0, 1}.
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.125, 0.125]]]))
    top_p = alg.sampling_logits(logits, tokens, alg.Sampling(top_p=0.7))
    assert top_p.isinf().tolist() == [[[False, False, True, True]]]
    assert math.isclose(alg.token_logprobs(top_p, tokens).item(), math.log(2 / 3), rel_tol=1e-6)
    # A drawn token the rounding left out stays in, so it never has probability 0.
    outside = alg.sampling_logits(logits, torch.tensor([[3]]), alg.Sampling(top_p=0.7))
    assert outside.isinf().tolist() == [[[False, False, True, False]]]
    # Repetition penalty 2 on seen tokens 1 (logit 2 -> 1) and 3 (logit -1 -> -2), then temperature 2.
    seen = torch.tensor([[[False, True, False, True]]])
    penalised = alg.sampling_logits(torch.tensor([[[3.0, 2.0, 1.0, -1.0]]]), tokens,
                                    alg.Sampling(temperature=2.0, repetition_penalty=2.0), seen)
    assert penalised.tolist() == [[[1.5, 0.5, 0.5, -1.0]]]
    assert alg.entropy_from_logits(top_p).isfinite().all()


def test_seen_tokens_are_the_prompt_and_the_response_so_far():
    prompts, real = torch.tensor([[0, 5]]), torch.tensor([[False, True]])  # a left-padded prompt
    seen = alg.seen_tokens(prompts, real, torch.tensor([[2, 3, 2]]), vocab=6)
    assert [row.nonzero().flatten().tolist() for row in seen[0]] == [[5], [2, 5], [2, 3, 5]]


def test_response_mask_stops_after_eos():
    responses = torch.zeros(2, 4, dtype=torch.long)
    mask = alg.response_mask(responses, torch.tensor([2, 3]))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_k1_kl_penalty_and_score_on_last_valid_token():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = alg.kl_estimate(logprobs, ref, "k1") * mask  # [0.5, -1, 0]
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
    loss, stats = alg.policy_loss(logprobs, old, adv, torch.ones(1, 2), clip_low=0.2)
    # token 0: min(1.5, 1.2) = 1.2; token 1: min(-1.5, -1.2) = -1.5; loss = -(1.2 - 1.5) / 2
    assert math.isclose(loss.item(), 0.15, rel_tol=1e-6)
    assert math.isclose(stats["clip_frac"].item(), 0.5)


def test_policy_loss_gradient_flows_only_through_unclipped_tokens():
    logprobs = torch.full((1, 2), math.log(1.5), requires_grad=True)
    loss, _ = alg.policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]),
                              torch.ones(1, 2), clip_low=0.2)
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


def test_kl_estimators():
    logprobs, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log r = 0.5
    assert math.isclose(alg.kl_estimate(logprobs, ref, "k1").item(), 0.5)
    assert math.isclose(alg.kl_estimate(logprobs, ref, "k2").item(), 0.125)
    assert math.isclose(alg.kl_estimate(logprobs, ref, "k3").item(), math.exp(-0.5) - 0.5, rel_tol=1e-6)
    # k3 is never negative, also where k1 is
    assert alg.kl_estimate(ref, logprobs, "k3").item() > 0 > alg.kl_estimate(ref, logprobs, "k1").item()


def test_loss_aggregations():
    values = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert math.isclose(alg.aggregate(values, mask, "token_mean").item(), 7 / 3, rel_tol=1e-6)
    assert math.isclose(alg.aggregate(values, mask, "seq_mean_token_mean").item(), (1.5 + 4) / 2)
    assert math.isclose(alg.aggregate(values, mask, "seq_mean_token_sum_norm", norm_len=4).item(), 7 / 8)


def test_clip_higher_dual_clip_and_importance_weights():
    ones = torch.ones(1, 1)
    up = torch.full((1, 1), math.log(1.5))
    loss, _ = alg.policy_loss(up, torch.zeros(1, 1), ones, ones, clip_low=0.2, clip_high=0.28)
    assert math.isclose(loss.item(), -1.28, rel_tol=1e-6)  # ratio capped at 1 + 0.28
    big = torch.full((1, 1), math.log(5.0))
    loss, _ = alg.policy_loss(big, torch.zeros(1, 1), -ones, ones, clip_low=0.2)
    assert math.isclose(loss.item(), 5.0, rel_tol=1e-6)  # max(5, 1.2) for a negative advantage
    loss, _ = alg.policy_loss(big, torch.zeros(1, 1), -ones, ones, clip_low=0.2, dual_clip=3.0)
    assert math.isclose(loss.item(), 3.0, rel_tol=1e-6)  # capped at c * |A|
    loss, _ = alg.policy_loss(up, torch.zeros(1, 1), ones, ones, clip_low=0.2,
                              is_weights=torch.full((1, 1), 0.5))
    assert math.isclose(loss.item(), -0.6, rel_tol=1e-6)


def test_entropy_from_logits():
    assert math.isclose(alg.entropy_from_logits(torch.zeros(2)).item(), math.log(2), rel_tol=1e-6)
    assert alg.entropy_from_logits(torch.tensor([100.0, 0.0])).item() < 1e-6


def test_group_baselines_on_one_group_of_three():
    scores, valid = torch.tensor([1.0, 2.0, 3.0]), torch.ones(3)

    def out(estimator, **kw):
        return alg.outcome_scores(scores, estimator, 3, valid, **kw).tolist()

    assert out("gae") == out("reinforce_pp") == [1.0, 2.0, 3.0]
    assert out("dr_grpo") == out("reinforce_pp_baseline") == [-1.0, 0.0, 1.0]
    assert torch.allclose(torch.tensor(out("grpo")), torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5)  # std 1
    assert out("rloo") == [1 - 2.5, 2 - 2.0, 3 - 1.5]
    assert out("remax", greedy_scores=torch.tensor([2.5])) == [-1.5, -0.5, 0.5]


def test_group_baselines_leave_invalid_samples_out():
    got = alg.outcome_scores(torch.tensor([1.0, 100.0, 3.0]), "grpo", 3, torch.tensor([1.0, 0.0, 1.0]))
    s = 1 / math.sqrt(2)  # mean 2, sample std sqrt(2)
    assert torch.allclose(got, torch.tensor([-s, 0.0, s]), atol=1e-5)


def test_rloo_gives_no_signal_to_a_group_with_one_valid_sample():
    """As GRPO: with no other valid sample there is no baseline, so 0 rather than the raw score."""
    scores, valid = torch.tensor([5.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 1.0, 1.0])
    for estimator in ("rloo", "grpo", "dr_grpo"):
        got = alg.outcome_scores(scores, estimator, 2, valid).tolist()
        assert got[:2] == [0.0, 0.0], estimator
    assert alg.outcome_scores(scores, "rloo", 2, valid).tolist()[2:] == [-1.0, 1.0]


def test_remax_baseline_is_normalised_by_the_samples_statistics():
    """reward.normalize: the greedy scores are scaled with the sampled batch's mean and std, so the
    advantage is (s - b) / std(s), not the difference of two separately normalised batches."""
    from rayrlhf.config import load_config
    from rayrlhf.driver import score_rollout, shape_rewards
    from rayrlhf.rollout_service import Rollout

    def rollout(n):
        batch = build_batch([[1]] * n, [[2, 3]] * n, pad_id=0)
        batch["mask"], batch["truncated"] = torch.ones(n, 2), torch.zeros(n)
        return Rollout(batch, ["p"] * n, ["r"] * n, {}, [])

    cfg = load_config("conf/tiny_ppo.yaml", ["reward.normalize=true"])
    sampled, greedy = rollout(4), rollout(2)
    samples, baseline = torch.tensor([1.0, 3.0, 2.0, 6.0]), torch.tensor([2.0, 5.0])
    score_rollout(sampled, {"scores": samples, "reasons": {}, "metrics": {}}, cfg)
    shape_rewards(sampled, cfg.reward)
    score_rollout(greedy, {"scores": baseline, "reasons": {}, "metrics": {}}, cfg)
    shape_rewards(greedy, cfg.reward, like=sampled)
    advantages = alg.outcome_scores(sampled.batch["scores"], "remax", 2, torch.ones(4),
                                    greedy.batch["scores"])
    expected = (samples - baseline.repeat_interleave(2)) / samples.std()
    assert torch.allclose(advantages, expected, atol=1e-5)


def test_discounted_returns():
    ret = alg.discounted_returns(torch.tensor([[1.0, 2.0, 7.0]]), torch.tensor([[1.0, 1.0, 0.0]]), 0.5)
    assert ret.tolist() == [[2.0, 2.0, 0.0]]


def test_scores_get_the_penalties_then_normalisation_then_clipping():
    """reward.truncated_penalty and the overlong penalty go into the penalised scores (what the
    estimator and dynamic sampling compare); shape_scores then normalises over the valid samples
    and clips. Lengths 6 and 8 of at most 8 tokens, a buffer of 2 to a penalty of 0.5: 0 and -0.5."""
    from rayrlhf.config import load_config
    from rayrlhf.driver import score_rollout
    from rayrlhf.rollout_service import Rollout

    batch = build_batch([[1]] * 3, [[2] * 6, [2] * 8, [2] * 8], pad_id=0)
    batch["mask"], batch["truncated"] = torch.ones(3, 8), torch.tensor([0.0, 1.0, 0.0])
    rollout = Rollout(batch, ["p"] * 3, ["r"] * 3, {}, [])
    cfg = load_config("conf/tiny_ppo.yaml", ["reward.truncated_penalty=-1", "rollout.max_new_tokens=8",
                                             "reward.overlong_buffer=2", "reward.overlong_penalty=0.5",
                                             "reward.skip_invalid=true"])
    score_rollout(rollout, {"scores": torch.tensor([1.0, 3.5, math.nan]), "reasons": {2: "nan"},
                            "metrics": {}}, cfg)
    assert batch["penalised_scores"].tolist() == [1.0, 2.0, -0.5]  # 3.5 - 1 - 0.5; the NaN read as 0
    assert batch["valid"].tolist() == [1.0, 1.0, 0.0]
    assert rollout.reward_metrics["overlong_penalty"].tolist() == [0.0, -0.5, -0.5]
    penalised, valid = batch["penalised_scores"], batch["valid"]
    assert alg.shape_scores(penalised, valid, normalize=False, clip=None).tolist() == [1.0, 2.0, 0.0]
    normalised = alg.shape_scores(penalised, valid, normalize=True, clip=None)
    s = 1 / math.sqrt(2)  # [1, 2]: mean 1.5, sample std 1/sqrt(2)
    assert torch.allclose(normalised, torch.tensor([-s, s, 0.0]), atol=1e-4)
    clipped = alg.shape_scores(penalised, valid, normalize=True, clip=0.5)
    assert torch.allclose(clipped, torch.tensor([-0.5, 0.5, 0.0]))


def test_overlong_penalty_grows_linearly_over_the_buffer():
    lengths = torch.tensor([3, 6, 7, 8, 10])
    got = alg.overlong_penalty(lengths, max_len=10, buffer=4, penalty=2.0)
    assert got.tolist() == [0.0, 0.0, -0.5, -1.0, -2.0]
    assert alg.overlong_penalty(lengths, 10, buffer=0, penalty=2.0).tolist() == [0.0] * 5


def test_informative_groups_need_two_valid_samples_that_differ():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 5.0, 7.0, 2.0, 2.0])
    valid = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    # equal; different; one valid sample left; equal
    assert alg.informative_groups(scores, valid, 2).tolist() == [False, True, False, False]
    assert alg.informative_groups(scores, valid, 4).tolist() == [True, True]


def test_dynamic_sampling_takes_the_first_informative_groups_then_tops_up():
    from rayrlhf.driver import choose_groups

    rounds = [[False, True, True], [True, False, False]]
    assert choose_groups(rounds, need=2) == ([(0, 1), (0, 2)], [])
    assert choose_groups(rounds, need=3) == ([(0, 1), (0, 2), (1, 0)], [])
    # Short by one: the first uninformative group fills the batch (masked out of the loss).
    assert choose_groups([[False, True], [False, False]], need=3) == ([(0, 1)], [(0, 0), (1, 0)])


def test_masked_truncated_responses_count_in_their_group_but_train_nothing():
    """algorithm.mask_truncated: sample 1 of the group (scores 1, 0, 0, 1) was cut at the length
    limit; GRPO's group statistics still include its 0, so the others' advantages are those of the
    whole group, and its own tokens leave the loss."""
    from types import SimpleNamespace

    from rayrlhf.driver import add_advantages

    batch = build_batch([[1]] * 4, [[2, 3]] * 4, pad_id=0)
    batch["mask"], batch["valid"] = torch.ones(4, 2), torch.ones(4)
    batch["scores"] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    batch["truncated"] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    algo = SimpleNamespace(estimator="grpo", kl_in="loss", gamma=1.0, mask_truncated=True)
    add_advantages(batch, algo, kl_coef=0.0, group_size=4)
    assert batch["mask"].tolist() == [[1, 1], [0, 0], [1, 1], [1, 1]]
    a = 0.5 / math.sqrt(1 / 3)  # (s - 0.5) / sample std of (1, 0, 0, 1)
    assert torch.allclose(batch["advantages"][:, 0], torch.tensor([a, 0.0, -a, a]), atol=1e-5)


def test_gspo_ratio_is_the_responses_length_normalised_ratio():
    """Row 0: log-ratios 0.2 and 0 -> s = exp(0.1) on both tokens; row 1: one valid token of 0.3
    (the padding's 5.0 takes no part) -> s = exp(0.3). With A = -1 nothing is clipped at 0.5 and
    loss = token mean of s; its gradient is s per token, over the 3 tokens."""
    logprobs = torch.tensor([[0.2, 0.0], [0.3, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = alg.policy_loss(logprobs, torch.zeros(2, 2), -torch.ones(2, 2), mask, clip_low=0.5,
                                  ratio_level="sequence")
    s0, s1 = math.exp(0.1), math.exp(0.3)
    assert math.isclose(loss.item(), (2 * s0 + s1) / 3, rel_tol=1e-6)
    assert math.isclose(stats["ratio_mean"].item(), (2 * s0 + s1) / 3, rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[s0, s0], [s1, 0.0]]) / 3)
    # Clipped per response: with A = +1 and clip 0.05, s0 = 1.105 and s1 = 1.35 are both capped.
    loss, stats = alg.policy_loss(logprobs, torch.zeros(2, 2), torch.ones(2, 2), mask, clip_low=0.05,
                                  ratio_level="sequence")
    assert math.isclose(loss.item(), -1.05, rel_tol=1e-6) and stats["clip_frac"].item() == 1.0


def test_cispo_keeps_every_tokens_gradient_weighted_by_the_clipped_ratio():
    """Ratios 1.5 and 1.1 with A = 2, clip (0.2, 0.28): weights sg(1.28) and sg(1.1); the loss is
    -mean(w A log pi), so d/dlog pi = -w A / 2, also for the clipped token (PPO's would be 0)."""
    logprobs = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    adv = torch.full((1, 2), 2.0)
    loss, stats = alg.policy_loss(logprobs, torch.zeros(1, 2), adv, torch.ones(1, 2), clip_low=0.2,
                                  clip_high=0.28, kind="cispo")
    expected = -(1.28 * 2 * math.log(1.5) + 1.1 * 2 * math.log(1.1)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert stats["clip_frac"].item() == 0.5
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-1.28, -1.1]]))
    ppo = logprobs.detach().requires_grad_()
    alg.policy_loss(ppo, torch.zeros(1, 2), adv, torch.ones(1, 2), 0.2, 0.28)[0].backward()
    assert ppo.grad[0, 0] == 0 and torch.isclose(ppo.grad[0, 1], torch.tensor(-1.1))


def test_preference_losses():
    """logps (chosen, rejected) = (-1, -3), reference (-2, -2), beta 0.5: rewards 0.5 and -0.5, margin 1."""
    logps, ref = torch.tensor([[-1.0, -3.0]], requires_grad=True), torch.tensor([[-2.0, -2.0]])
    lengths = torch.tensor([[2, 4]])

    def loss(kind, **kwargs):
        return alg.preference_loss(logps, lengths, ref, kind, beta=0.5, **kwargs)

    sigmoid, stats = loss("sigmoid")
    assert math.isclose(sigmoid.item(), math.log(1 + math.exp(-1)), rel_tol=1e-6)  # -log sigmoid(1)
    assert (stats["rewards_chosen"].item(), stats["rewards_rejected"].item(), stats["margin"].item(),
            stats["accuracy"].item()) == (0.5, -0.5, 1.0, 1.0)
    sigmoid.backward()  # d/dlogp_chosen = -beta sigmoid(-1); rejected the opposite
    g = 0.5 / (1 + math.e)
    assert torch.allclose(logps.grad, torch.tensor([[-g, g]]))
    smoothed, _ = loss("sigmoid", label_smoothing=0.1)  # 0.9 (-log sigmoid(1)) + 0.1 (-log sigmoid(-1))
    assert math.isclose(smoothed.item(), 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e),
                        rel_tol=1e-6)
    assert loss("hinge")[0].item() == 0.0  # max(0, 1 - 1)
    assert math.isclose(alg.preference_loss(logps, lengths, ref, "hinge", beta=0.25)[0].item(), 0.5)
    # IPO on averaged log-probs: chosen -1/2 vs -1, rejected -3/4 vs -1/2: h = 0.5 + 0.25; (h - 1)^2
    assert math.isclose(loss("ipo")[0].item(), 0.0625, rel_tol=1e-6)
    # SimPO, no reference: beta 2 x averages (-0.5, -0.75) -> margin 0.5, minus gamma 0.5 -> log 2
    simpo, stats = alg.preference_loss(logps, lengths, None, "simpo", beta=2.0, simpo_gamma=0.5)
    assert math.isclose(simpo.item(), math.log(2), rel_tol=1e-6)
    assert stats["rewards_chosen"].item() == -1.0 and stats["margin"].item() == 0.5


def test_learning_rate_schedules():
    from rayrlhf.trainer import lr_factor

    # Warm-up of 3 steps rises in quarters; then 1 at step 4, down to the floor at step 8.
    assert [lr_factor(i, "linear", 3, 8, 0.2) for i in range(1, 9)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 0.8, 0.6, 0.4, 0.2])
    assert [lr_factor(i, "cosine", 0, 3, 0.0) for i in (1, 2, 3)] == pytest.approx([1.0, 0.5, 0.0])
    assert [lr_factor(i, "constant", 1, 5, 0.0) for i in (1, 2, 5)] == [0.5, 1.0, 1.0]
    assert lr_factor(12, "linear", 0, 8, 0.1) == pytest.approx(0.1)  # past the end: the floor
