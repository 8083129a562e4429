"""Parameter-efficient methods (rayrlhf/adapters.py): our forward with a soft prompt against peft's
own, the merged plain weights against the adapted model, and every method trained by the real
SFT, reward-model and PPO stages."""

import json
from pathlib import Path

import pytest
import torch

from rayrlhf.adapters import (
    SOFT_PROMPT_DIR,
    apply_peft,
    hf_weights,
    last_hidden_state,
    plain_model,
    quantization,
)
from rayrlhf.config import PeftConfig, load_config
from rayrlhf.data import load_supervised, preference_batch, sft_batch
from rayrlhf.errors import ModelError
from rayrlhf.modeling import check_model_path, load_causal_lm, load_tokenizer, segment_mask
from rayrlhf.objectives import OBJECTIVES
from rayrlhf.pipeline import run_pipeline
from rayrlhf.supervised import train_supervised
from rayrlhf.validation import MERGEABLE_PEFT, SOFT_PROMPT_PEFT


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory):
    """A small Qwen2: grouped-query attention (2 key-value heads of 4) and biases on q, k and v,
    the two things the tiny Llama lacks that the methods treat specially."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen2")
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # the biases start at 0, which no scaling would change
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    return str(path)


def adapted(path: str, method: str, **settings):
    cfg = PeftConfig(method=method, virtual_tokens=3, encoder_hidden_size=32, **settings)
    model = apply_peft(load_causal_lm(path, "float32", quantization(cfg, torch.float32)), cfg, False, 10)
    torch.manual_seed(1)
    with torch.no_grad():  # away from the start, where LoRA's update is 0 and IA3's scales are 1
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("method", SOFT_PROMPT_PEFT)
def test_soft_prompt_forward_is_peft_own_and_packs(qwen2_path, method):
    """Our forward (virtual tokens at positions 0..n-1, the inputs after them) gives peft's logits;
    two sequences packed in a row under a segment mask each see the virtual tokens and themselves,
    as they would alone."""
    model = adapted(qwen2_path, method)
    ids = torch.tensor([[5, 9, 14, 3, 7, 21, 8], [11, 4, 4, 60, 2, 9, 30]])
    full = torch.ones_like(ids)
    ours = last_hidden_state(model, {"input_ids": ids, "attention_mask": full,
                                     "position_ids": torch.arange(7).expand(2, 7)})
    logits = model.get_base_model().lm_head(ours)
    theirs = model(input_ids=ids, attention_mask=full).logits[:, -7:]
    torch.testing.assert_close(logits, theirs, atol=1e-5, rtol=1e-5)

    packed = {"input_ids": ids.flatten()[None, :11], "position_ids": torch.tensor([[*range(7), *range(4)]]),
              "attention_mask": segment_mask(torch.tensor([[1] * 7 + [2] * 4]))}
    torch.testing.assert_close(last_hidden_state(model, packed)[0], torch.cat([ours[0], ours[1, :4]]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", MERGEABLE_PEFT)
def test_merged_weights_compute_what_the_adapted_model_does(qwen2_path, method):
    """The plain model built from hf_weights (the engines', saved models' and next stages' weights)
    gives the adapted model's logits: LoRA's and AdaLoRA's update added, IA3's scales multiplied in
    (the q, k, v biases too), QLoRA's 4-bit base dequantized to fp32 first."""
    from transformers import AutoModelForCausalLM

    settings = {"feedforward_modules": ["down_proj"]} if method == "ia3" else {}
    targets = ["q_proj", "v_proj", "down_proj"]
    model = adapted(qwen2_path, method, target_modules=targets, **settings)
    plain = AutoModelForCausalLM.from_pretrained(qwen2_path)
    state = {name: compute() for name, _, compute in hf_weights(model)}
    assert state.keys() == plain.state_dict().keys()
    assert all(state[k].dtype == torch.float32 for k in state)
    plain.load_state_dict(state)
    ids = torch.tensor([[5, 9, 14, 3, 7, 21, 8, 50, 61]])
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    if method == "ia3":  # the q and v biases were scaled with their outputs
        start = plain.state_dict() | AutoModelForCausalLM.from_pretrained(qwen2_path).state_dict()
        assert not torch.allclose(state["model.layers.0.self_attn.q_proj.bias"],
                                  start["model.layers.0.self_attn.q_proj.bias"])


def stage_config(tmp_path, policy, stage, method, out, *more):
    return load_config("conf/tiny_pipeline.yaml", [
        f"model.path={policy}", "model.build_tiny=false", f"output_dir={tmp_path / out}",
        f"{stage}.lr=1e-2", f"{stage}.max_steps=4", f"{stage}.eval_every=0", f"{stage}.checkpoint_every=2",
        f"{stage}.peft.method={method}",
        # AdaLoRA's reallocation needs the plain optimizer (see validation). Its budget shrinks
        # over the run's steps, which a run stopped by max_steps=2 counts as 2: with one step of
        # warm-up its budget is the full one up to the stop in both runs, and after it the pruning
        # follows the importance scores kept in the checkpoint.
        *([f"{stage}.zero_stage=0", f"{stage}.peft.warmup_steps=1"] if method == "adalora" else []),
        # Every method on the q, v and MLP down projections, IA3 scaling the latter's input.
        f"{stage}.peft.target_modules=[q_proj,v_proj,down_proj]",
        f"{stage}.peft.feedforward_modules=[down_proj]",
        *more], stage=stage)


def metric_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def saved_model(path: Path, stage: str):
    """The stage's saved model as a user loads it: transformers, then peft for a soft prompt."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1) if stage == "rm" \
        else AutoModelForCausalLM.from_pretrained(path)
    if (path / SOFT_PROMPT_DIR).exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path / SOFT_PROMPT_DIR)
    return model.eval()


def held_out_metrics(cfg, stage: str, model) -> dict[str, float]:
    """The stage's held-out metrics of `model`, computed here as the trainer ranks compute them."""
    tokenizer = load_tokenizer(cfg.model.path)
    data = load_supervised(stage, cfg[stage].data, cfg.data.task, tokenizer, cfg.seed)
    batch = sft_batch([[e] for e in data.eval], tokenizer.pad_token_id) if stage == "sft" else \
        preference_batch(data.eval, tokenizer.pad_token_id)
    objective = OBJECTIVES[stage]
    with torch.no_grad():
        return objective.held_out_metrics(objective.of(cfg[stage]).held_out_sums(model, batch))


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_every_method_trains_saves_and_resumes(tmp_path, ray_cluster, tiny_policy, stage):
    """Each method through the real stage (Ray, DeepSpeed, 4 steps): it trains only its own
    parameters; the saved model, loaded by transformers (and peft for a soft prompt), scores the
    held-out data as the ranks did at the last step. LoRA runs on two ranks (SFT with packed rows),
    a prefix on two ZeRO-3 ranks (packed SFT rows under its virtual keys). SFT checkpoints keep a
    4-bit base's adapters and AdaLoRA's rank allocation: steps 3 and 4 after a resume are the
    uninterrupted run's (the reward model's checkpoints are the same code)."""
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_policy).state_dict()
    two_ranks = [f"{stage}.num_ranks=2", f"{stage}.micro_batch_size=16"] + \
        ([f"{stage}.packing=true"] if stage == "sft" else [])
    layout = {"lora": two_ranks, "prefix": [*two_ranks, f"{stage}.zero_stage=3"]}
    methods = (*MERGEABLE_PEFT, *SOFT_PROMPT_PEFT)
    configs = {m: stage_config(tmp_path, tiny_policy, stage, m, m, *layout.get(m, [])) for m in methods}
    summaries = run_stages(ray_cluster, [(stage, configs[m]) for m in methods])
    resumed = ("qlora", "adalora") if stage == "sft" else ()
    for more in (f"{stage}.max_steps=2", "resume=true"):
        run_stages(ray_cluster, [(stage, stage_config(tmp_path, tiny_policy, stage, m, f"{m}-split", more))
                                 for m in resumed])
    for method in methods:
        summary, rows = summaries[methods.index(method)], metric_rows(tmp_path / method)
        model = saved_model(tmp_path / method / "model", stage)
        if stage == "sft":
            assert summary["eval/loss"] < rows[0]["loss/sft"], (method, rows)
        ours = held_out_metrics(configs[method], stage, model)
        assert ours == pytest.approx({k: summary[k] for k in ours}, abs=1e-5), method

        saved = {k: v for k, v in plain_model(model).state_dict().items() if k in start}
        changed = {k for k, v in saved.items() if not torch.equal(v, start[k])}
        if method in SOFT_PROMPT_PEFT:
            assert not changed, (method, changed)
            # PPO's roles (and the next stages) would load the weights without the prompt: refused.
            with pytest.raises(ModelError, match="trained with a soft prompt"):
                check_model_path("reward.models[0].path", str(tmp_path / method / "model"))
        elif method != "qlora":  # (whose saved weights are all its 4-bit base's, dequantized)
            assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))
                                   for k in changed), (method, changed)
        if method in resumed:
            loss = f"loss/{stage}"
            split = [r[loss] for r in metric_rows(tmp_path / f"{method}-split")]
            assert split[2:] == pytest.approx([r[loss] for r in rows[2:]], abs=1e-6), method


def run_stages(ray, runs: list) -> list[dict]:
    """train_supervised of each (stage, config), in Ray tasks two at a time: each run mostly waits
    for its trainer actor's start-up on one core, so two take about the time of one."""
    stage_task = ray.remote(num_cpus=0)(train_supervised)
    summaries = []
    for start in range(0, len(runs), 2):
        summaries += ray.get([stage_task.remote(stage, cfg) for stage, cfg in runs[start:start + 2]])
    return summaries


@pytest.mark.integration
def test_mergeable_methods_train_actor_and_critic_with_engines_in_step(tmp_path, ray_cluster, tiny_policy):
    """The pipeline carries each stage's method: an AdaLoRA SFT, a LoRA reward model, then PPO from
    both with a QLoRA actor and an IA3 critic (from the reward model). The engines sample with the
    merged policy, the 4-bit base dequantized plus the update (synced before the first batch, which
    the full-precision checkpoint the engines loaded would otherwise sample): their log-probs match
    the trainer's at every step while the policy moves. The actor also serves the reference from its
    own 4-bit base, its adapter off: where the policy starts (the first batch's KL is 0), with no
    reference workers. (The other methods' merged weights: test_merged_weights_...)"""
    run_pipeline(load_config("conf/tiny_pipeline.yaml", [
        f"model.path={tiny_policy}", "model.build_tiny=false", f"output_dir={tmp_path}", "sft.max_steps=4",
        "rm.max_steps=4", "eval.every=0", "trainer.total_steps=3", "trainer.prompts_per_step=16",
        "algorithm.train_batch_size=16", "actor.micro_batch_size=16", "critic.micro_batch_size=16",
        "actor.lr=1e-2", "sft.peft.method=adalora", "sft.zero_stage=0", "rm.peft.method=lora",
        "actor.peft.method=qlora", "reference.from_actor_base=true", "critic.peft.method=ia3",
        "critic.peft.target_modules=[q_proj,v_proj,down_proj]",
        "critic.peft.feedforward_modules=[down_proj]"], stage=None))
    rows = metric_rows(tmp_path / "ppo")
    assert all(r["sync/logprob_gap_max"] < 1e-3 for r in rows), rows
    assert rows[-1]["kl/mean"] > 1e-3, rows  # the policy moved, so the agreement is not trivial
    assert rows[0]["kl/mean"] == 0 and not any(k.startswith("memory/reference") for k in rows[0])
