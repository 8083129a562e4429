"""Held-out task scores: the prompts no stage trains on, and eval.function's verdict on a policy's
answers to them. The PPO driver's Evaluator asks the run's own engines; a saved policy (the DPO
stage's first and last) is answered by an engine of its own (policy_task_score)."""

from __future__ import annotations

from omegaconf import DictConfig

from rayrlhf.cluster import RoleGroup, wait
from rayrlhf.data import Prompt, load_prompts
from rayrlhf.rewards import load_reward_function
from rayrlhf.rollout import engine_class
from rayrlhf.validation import role_placement


def held_out_prompts(cfg: DictConfig, tokenizer) -> list[Prompt]:
    """eval.size prompts of eval.path, or of the built-in task's held-out set."""
    return load_prompts(cfg.data, tokenizer, cfg.seed + 1, path=cfg.eval.path, size=cfg.eval.size,
                        held_out=True)[:cfg.eval.size]


def rule_scores(rule, prompts: list, responses: list[str], fields: dict[str, list]) -> dict[str, float]:
    """eval/rule_score, the mean of the rule's scores, and eval/<name>, the mean of any other list
    it returns."""
    out = rule(prompts, responses, **fields)
    scores, extra = (out.pop("reward"), out) if isinstance(out, dict) else (out, {})
    return {"eval/rule_score": sum(scores) / len(scores),
            **{f"eval/{key}": sum(values) / len(values) for key, values in extra.items()}}


def policy_task_score(cfg: DictConfig, model_path: str, tokenizer) -> float:
    """eval.function's mean score of the policy at `model_path` on the held-out prompts, answered by
    one engine started for it (greedily with eval.greedy, else rollout.n samples each)."""
    prompts, r = held_out_prompts(cfg, tokenizer), cfg.rollout
    engine_args = (model_path, cfg.model.tokenizer, r, cfg.model.dtype, cfg.seed,
                   cfg.data.max_prompt_tokens + r.max_new_tokens)
    engine = RoleGroup("rollout", engine_class(r.engine), 1, r.cpus_per_engine, r.gpus_per_engine,
                       cfg.ray.threads_per_actor, lambda _: engine_args,
                       role_placement(cfg.ray, "rollout"))
    try:
        seeds = [cfg.seed + i * r.n for i in range(len(prompts))]
        answers = wait(engine.actors[0].generate.remote([p.token_ids for p in prompts], seeds,
                                                        greedy=cfg.eval.greedy),
                       f"evaluation of {model_path}", cfg.ray.call_timeout_s)
    finally:
        engine.shutdown()
    pairs = [(prompt, sample) for prompt, samples in zip(prompts, answers, strict=True) for sample in samples]
    fields = {key: [prompt.fields.get(key) for prompt, _ in pairs] for key in prompts[0].fields}
    return rule_scores(load_reward_function(cfg.eval.function), [p.text for p, _ in pairs],
                       [s.text for _, s in pairs], fields)["eval/rule_score"]
