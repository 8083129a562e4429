"""Config loading: presets, overrides, and errors that name the bad key before any actor starts."""

import re
from pathlib import Path

import pytest

from rayrlhf.config import ConfigError, load_config

PRESET = "conf/tiny_ppo.yaml"


def test_preset_and_overrides_merge():
    cfg = load_config(PRESET, ["trainer.total_steps=3", "actor.zero_stage=3", "seed=7"])
    assert cfg.trainer.total_steps == 3
    assert cfg.actor.zero_stage == 3
    assert cfg.seed == 7
    assert cfg.model.build_tiny is True  # from the preset
    assert cfg.critic.zero_stage == 2  # from the schema default


@pytest.mark.parametrize("override, message", [
    ("trainer.totl_steps=3", "unknown config key 'trainer.totl_steps'"),
    ("nonsense=1", "unknown config key 'nonsense'"),
    ("trainer.total_steps=abc", "bad value for config key 'trainer.total_steps'"),
    ("trainer.total_steps=0", "'trainer.total_steps' must be >= 1"),
    ("actor.zero_stage=4", "'actor.zero_stage' must be one of 0, 1, 2, 3; got 4"),
    ("algorithm.clip_eps=1.5", "'algorithm.clip_eps' must be in (0, 1)"),
    ("rollout.temperature=0", "'rollout.temperature' must be > 0"),
    ("algorithm.train_batch_size=100", "'algorithm.train_batch_size' (100) must divide"),
    ("actor.micro_batch_size=48", "'actor.micro_batch_size'"),
    ("rollout.engine=sglang", "'rollout.engine' must be one of vllm; got 'sglang'"),
    ("model.dtype=int8", "'model.dtype' must be one of float32, bfloat16, float16; got 'int8'"),
    ("model.linear_backend=mkl", "'model.linear_backend' must be one of auto, onednn, torch; got 'mkl'"),
    ("trainer.total_steps", "not of the form key=value"),
    ("algorithm.estimator=ppo", "'algorithm.estimator' must be one of gae, grpo"),
    ("algorithm.kl_estimator=k4", "'algorithm.kl_estimator' must be one of k1, k2, k3"),
    ("algorithm.loss_agg=sum", "'algorithm.loss_agg' must be one of"),
    ("algorithm.kl_in=both", "'algorithm.kl_in' must be one of reward, loss"),
    ("algorithm.dual_clip=0.5", "'algorithm.dual_clip' must be > 1"),
    ("ray.placement_strategy=RANDOM", "'ray.placement_strategy' must be one of PACK, SPREAD"),
    ("ray.call_timeout_s=0", "'ray.call_timeout_s' must be > 0"),
    ("ray.node_loss_timeout_s=0", "'ray.node_loss_timeout_s' must be > 0"),
    ("ray.roles.rolout.strategy=SPREAD", "unknown config key 'ray.roles.rolout'"),
    ("ray.roles.actor.strategy=RANDOM", "'ray.roles.actor.strategy' must be one of , PACK, SPREAD"),
    ("algorithm.estimator=grpo", "'rollout.n' must be >= 2 for algorithm.estimator=grpo"),
    ("ray.colocate=[[actor,judge]]", "'ray.colocate' names 'judge'; roles are rollout, reference"),
    ("ray.colocate=[[actor,reward],[reward,critic]]", "'ray.colocate' names a role more than once"),
    ("rollout.max_restarts=-1", "'rollout.max_restarts' must be >= 0"),
    ("bench.sweep_prompts=[0]", "'bench.sweep_prompts' must hold values >= 1"),
    ("model.tiny_hidden_size=100", "'model.tiny_hidden_size' must be a positive multiple of 32"),
    ("rollout.sleep=true", "'rollout.sleep' is for GPU engines"),
    ("rollout.block_size=-32", "'rollout.block_size' must be >= 0, got -32"),
    ("weight_sync.transport=cuda_ipc", "'weight_sync.transport' cuda_ipc needs GPU trainers"),
    ("algorithm.kl_in=loss", "'algorithm.kl_estimator' k1 with algorithm.kl_in=loss gives the KL term zero "
                             "expected gradient"),
    ("algorithm.policy_loss=grpo", "'algorithm.policy_loss' must be one of ppo, cispo; got 'grpo'"),
    ("algorithm.ratio_level=group", "'algorithm.ratio_level' must be one of token, sequence"),
    ("algorithm.dynamic_sampling.enable=true", "'rollout.n' must be >= 2 with algorithm.dynamic_sampling"),
    ("algorithm.dynamic_sampling.oversample=0.5", "'algorithm.dynamic_sampling.oversample' must be >= 1"),
    ("algorithm.dynamic_sampling.max_extra_rounds=-1", "'algorithm.dynamic_sampling.max_extra_rounds' must"),
    ("reward.overlong_buffer=9", "'reward.overlong_buffer' (9) must not exceed the response length limit "
                                 "(8 tokens)"),
    ("reward.overlong_penalty=-1", "'reward.overlong_penalty' must be >= 0"),
    ("pipeline.stages=[sft,rm,dpo]", "'pipeline.stages' runs dpo in place of rm and ppo"),
    ("pipeline.stages=[dpo,sft]", "'pipeline.stages' must be in the order sft, rm, ppo, dpo"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(PRESET, [override])
    assert message in str(err.value)


def test_recipe_combinations_that_cannot_run_are_refused():
    with pytest.raises(ConfigError, match="'algorithm.dual_clip' is for algorithm.policy_loss=ppo"):
        load_config(PRESET, ["algorithm.policy_loss=cispo", "algorithm.dual_clip=3"])
    with pytest.raises(ConfigError, match="'algorithm.dynamic_sampling' does not go with algorithm.estimator"
                                          "=remax"):
        load_config(PRESET, ["algorithm.estimator=remax", "rollout.n=2",
                             "algorithm.dynamic_sampling.enable=true"])
    with pytest.raises(ConfigError, match="'dpo.label_smoothing' is for the sigmoid and simpo losses"):
        load_config("conf/tiny_dpo.yaml", ["dpo.loss=ipo", "dpo.label_smoothing=0.1"], stage="dpo")
    with pytest.raises(ConfigError, match="'dpo.beta' must be > 0"):
        load_config("conf/tiny_dpo.yaml", ["dpo.beta=0"], stage="dpo")


def test_placements_that_cannot_hold_are_refused():
    with pytest.raises(ConfigError, match="'ray.roles' differs between the colocated roles actor, ref"):
        load_config(PRESET, ["ray.colocate=[[actor,reference]]", "ray.roles.actor.node_labels.pool=a"])
    with pytest.raises(ConfigError, match=r"'rollout.gpus_per_engine' must be rollout.\w+ \(4\) for"):
        load_config(PRESET, ["rollout.tensor_parallel_size=4", "rollout.gpus_per_engine=1",
                             "actor.gpus_per_rank=1"])


def test_compiled_layers_are_refused_with_partitioned_weights():
    with pytest.raises(ConfigError, match="'actor.compile' is not supported with zero_stage 3"):
        load_config(PRESET, ["actor.zero_stage=3", "actor.compile=true"])


@pytest.mark.parametrize("preset", sorted(Path("conf").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_validates(preset):
    """The GPU presets, which CI cannot run, at least stay valid configs as the schema changes; the
    pipeline presets as each of their stages will run."""
    from rayrlhf.pipeline import stage_configs

    if preset.name in ("tiny_pipeline.yaml", "tiny_agent.yaml", "tiny_dpo.yaml", "tiny_dapo.yaml"):
        assert stage_configs(load_config(preset, [], None))
    else:
        load_config(preset, [], "ppo")


def test_missing_model_path_and_missing_file():
    with pytest.raises(ConfigError, match="'model.path' is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("conf/no_such.yaml", [])


def test_gpu_roles_must_agree_for_weight_sync():
    with pytest.raises(ConfigError, match="rollout.gpus_per_engine"):
        load_config(PRESET, ["actor.gpus_per_rank=1"])


@pytest.mark.parametrize("preset", sorted(str(p) for p in Path("conf").glob("*.yaml")))
def test_every_preset_loads(preset):
    # The pipeline preset's PPO reward is the reward model it trains, added when the stage starts.
    assert load_config(preset, [], stage=None if "pipeline" in preset else "ppo").trainer.total_steps >= 1


def test_reward_sources():
    with pytest.raises(ConfigError, match="'reward.function' must be a built-in"):
        load_config(PRESET, ["reward.function=nope"])
    with pytest.raises(ConfigError, match="'reward' needs at least one source"):
        load_config(PRESET, ["reward.function="])
    cfg = load_config(PRESET, ["reward.models=[{path: /rm1, weight: 0.5}, {path: /rm2}]"])
    assert [(m.path, m.weight) for m in cfg.reward.models] == [("/rm1", 0.5), ("/rm2", 1.0)]


def test_only_the_roles_that_start_are_checked():
    """A GRPO run starts no critic and no SFT ranks: their settings cannot stop it."""
    grpo = ["algorithm.estimator=grpo", "rollout.n=4"]
    unused = ["critic.micro_batch_size=48", "critic.lr=0", "sft.lr=0", "rm.zero_stage=5"]
    load_config(PRESET, [*grpo, *unused])
    with pytest.raises(ConfigError, match="'critic.lr' must be > 0"):
        load_config(PRESET, ["critic.lr=0"])
    with pytest.raises(ConfigError, match="'sft.lr' must be > 0"):
        load_config(PRESET, ["sft.lr=0"], "sft")
    with pytest.raises(ConfigError, match="'rm.zero_stage' must be one of 0, 1, 2, 3; got 5"):
        load_config("conf/tiny_pipeline.yaml", ["rm.zero_stage=5"], None)
    no_kl = [*grpo, "algorithm.kl_coef=0", "reference.micro_batch_size=0"]
    load_config(PRESET, no_kl)
    with pytest.raises(ConfigError, match="'reference.micro_batch_size' must be >= 1"):
        load_config(PRESET, [*grpo, "reference.micro_batch_size=0"])


def test_roles_follow_the_algorithm():
    from rayrlhf.validation import roles_needed

    assert roles_needed(load_config(PRESET, [])) == {"rollout", "reward", "actor", "reference", "critic"}
    grpo = load_config(PRESET, ["algorithm.estimator=grpo", "rollout.n=4"])
    assert roles_needed(grpo) == {"rollout", "reward", "actor", "reference"}
    no_kl = load_config(PRESET, ["algorithm.estimator=rloo", "rollout.n=2", "algorithm.kl_coef=0"])
    assert roles_needed(no_kl) == {"rollout", "reward", "actor"}


def test_old_logprob_pass_only_when_pi_old_differs_from_the_trained_policy():
    from rayrlhf.driver import needs_old_logprob_pass

    one_step = ["trainer.prompts_per_step=8", "rollout.n=4", "algorithm.train_batch_size=32",
                "algorithm.ppo_epochs=1", "algorithm.kl_coef=0.1", "algorithm.kl_in=loss",
                "algorithm.kl_estimator=k3", "actor.micro_batch_size=8", "critic.micro_batch_size=8"]
    assert not needs_old_logprob_pass(load_config(PRESET, one_step))
    assert not needs_old_logprob_pass(load_config(PRESET, [*one_step, "algorithm.kl_in=reward",
                                                           "algorithm.kl_coef=0"]))
    for extra in ("algorithm.kl_in=reward",  # the KL reward is computed before training
                  "algorithm.ppo_epochs=2", "algorithm.train_batch_size=16",  # several steps per batch
                  "algorithm.recompute_old_logprobs=true"):
        assert needs_old_logprob_pass(load_config(PRESET, [*one_step, extra])), extra


def test_a_field_rule_says_what_the_value_must_be():
    from rayrlhf.validation import Rule

    assert Rule(gt=0, lt=1).problem(1.5) == "must be in (0, 1), got 1.5"
    assert Rule(ge=0, le=1).problem(0) is None
    assert Rule(ge=0, le=1).problem(-1) == "must be in [0, 1], got -1"
    assert Rule(gt=0, why="it divides").problem(0) == "must be > 0 (it divides), got 0"
    assert Rule(one_of=("a", "b")).problem("c") == "must be one of a, b; got 'c'"
    assert Rule(each_ge=1).problem([1, 0]) == "must hold values >= 1, got [1, 0]"
    assert Rule(gt=1).problem(None) is None  # an optional setting left unset


def test_every_default_keeps_its_own_rule():
    from dataclasses import fields, is_dataclass

    from rayrlhf.config import RunConfig

    def broken(schema) -> list[str]:
        out = []
        for spec in fields(schema):
            if is_dataclass(spec.default_factory):
                out += broken(spec.default_factory)
            elif "rule" in spec.metadata:
                default = spec.default_factory() if callable(spec.default_factory) else spec.default
                if spec.metadata["rule"].problem(default) is not None:
                    out.append(f"{schema.__name__}.{spec.name}")
        return out

    assert broken(RunConfig) == []


@pytest.mark.parametrize("stage, overrides, message", [
    ("ppo", ["actor.lora.rank=8"], "unknown config key 'actor.lora': LoRA moved to actor.peft (method=lora"),
    ("ppo", ["actor.peft.method=prefix"], "'actor.peft.method' prefix is for the sft, rm and dpo stages: a "
                                          "soft prompt's virtual tokens cannot be merged into the weights"),
    ("ppo", ["critic.peft.method=prompt"], "'critic.peft.method' prompt is for the sft, rm and dpo stages"),
    ("ppo", ["reference.from_actor_base=true"], "'reference.from_actor_base' needs an actor with a mergeable "
                                                "peft.method (lora, qlora, adalora, ia3); with "
                                                "actor.peft.method=none"),
    ("sft", ["sft.peft.method=qlora", "sft.zero_stage=3"], "'sft.peft.method' qlora runs with zero_stage"),
    ("rm", ["rm.peft.method=adalora"], "'rm.peft.method' needs rm.zero_stage=0: adalora reallocates ranks"),
    ("rm", ["rm.peft.method=adalora", "rm.zero_stage=0", "model.dtype=bfloat16"],
     "'rm.peft.method' needs model.dtype=float32"),
    ("sft", ["sft.peft.method=adalora", "sft.zero_stage=0", "sft.peft.init_rank=4"],
     "'sft.peft.init_rank' must be >= peft.rank (8), got 4"),
    ("sft", ["sft.peft.method=ia3", "sft.peft.feedforward_modules=[down_proj]"],
     "'sft.peft.feedforward_modules' must be among the target_modules; ['down_proj'] are not"),
    ("dpo", ["dpo.peft.method=ptuning", "dpo.packing=true"], "'dpo.packing' is not supported with "
                                                             "dpo.peft.method=ptuning"),
    (None, ["sft.peft.method=prompt"], "'pipeline.stages' cannot go on to rm after sft with "
                                       "sft.peft.method=prompt"),
    (None, ["rm.peft.method=ptuning_v2"], "'pipeline.stages' cannot go on to ppo after rm with "
                                          "rm.peft.method=ptuning_v2"),
])
def test_peft_combinations_that_cannot_run(stage, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("conf/tiny_pipeline.yaml", overrides, stage)
    if stage is None:  # a pipeline that ends at that stage runs
        stages = {"sft": "[sft]", "rm": "[sft,rm]"}[overrides[0].split(".")[0]]
        load_config("conf/tiny_pipeline.yaml", [*overrides, f"pipeline.stages={stages}"], stage=None)
