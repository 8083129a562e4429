"""Each trainer role's objective: the units its loss averages over and the layout it asks for."""

from types import SimpleNamespace

import pytest
import torch

from rayrlhf.batch import Batch
from rayrlhf.objectives import (
    OBJECTIVES,
    PairwiseRewardObjective,
    PolicyObjective,
    PreferenceObjective,
    SFTObjective,
    ValueObjective,
)

# Three responses of 2, 0 and 3 valid tokens.
MASK = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])


def test_every_trainer_role_has_an_objective():
    roles = ("actor", "critic", "sft", "rm", "dpo")
    assert set(OBJECTIVES) == set(roles)
    assert [OBJECTIVES[r].causal_lm for r in roles] == [True, False, True, False, True]


@pytest.mark.parametrize(("loss_agg", "units"), [
    ("token_mean", [2, 0, 3]),
    ("seq_mean_token_mean", [1, 0, 1]),  # a valid response counts once; an empty one not at all
    ("seq_mean_token_sum_norm", [1, 0, 1]),
])
def test_policy_units_follow_the_loss_aggregation(loss_agg, units):
    objective = PolicyObjective(algo=SimpleNamespace(loss_agg=loss_agg))
    assert objective.units(Batch(2, {"mask": MASK})).tolist() == units


def test_a_preference_pair_is_one_unit_and_only_simpo_needs_no_reference():
    assert PreferenceObjective().units(Batch(2, {"sequences": torch.zeros(3, 2, 4)})).tolist() == [1, 1, 1]
    assert PreferenceObjective(loss_kind="ipo").needs_reference
    assert not PreferenceObjective(loss_kind="simpo").needs_reference


def test_critic_sft_and_rm_units():
    assert ValueObjective().units(Batch(2, {"mask": MASK})).tolist() == [2, 0, 3]
    # SFT scores token t+1 from position t: the first column never counts.
    loss_mask = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 0]])
    assert SFTObjective().units(Batch(0, {"loss_mask": loss_mask})).tolist() == [2, 0]
    assert PairwiseRewardObjective().units(Batch(0, {"mask": MASK})).tolist() == [1, 1, 1]


@pytest.mark.parametrize(("packing", "share_prompts", "layout"), [
    (False, True, "none"), (True, False, "samples"), (True, True, "prompts")])
def test_ppo_roles_take_their_layout_from_the_role_config(packing, share_prompts, layout):
    role_cfg = SimpleNamespace(packing=packing, share_prompts=share_prompts)
    for role in ("actor", "critic"):
        objective = OBJECTIVES[role].of(role_cfg)
        assert objective.packing == layout
        assert objective.keeps_prompt_groups == (layout == "prompts")
    # SFT's packing packs whole samples into rows: nothing for the PPO layout to follow.
    assert OBJECTIVES["sft"].of(SimpleNamespace(packing=True)).packing == "none"


def test_a_batch_without_old_logprobs_takes_them_from_the_training_forward():
    assert PolicyObjective.old_from_forward(Batch(0, {"mask": MASK}))
    assert not PolicyObjective.old_from_forward(Batch(0, {"mask": MASK, "old_logprobs": MASK.float()}))
    assert not ValueObjective.old_from_forward(Batch(0, {"mask": MASK}))
