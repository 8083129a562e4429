"""Throughput baseline: Hugging Face TRL's GRPOTrainer on CPU, set up like a rayrlhf GRPO run.

What is measured: the wall-clock time of optimizer steps W+1..S of `GRPOTrainer.train()`, each
step being the whole GRPO iteration (sample completions with plain `transformers` generate, score
them, compute group advantages, forward + backward, optimizer step). Model loading, trainer setup
and the W warm-up steps are excluded. samples_per_s = (S - W) * P * N / that time, the same unit
as our runs report (one sample = one prompt-completion pair).

With --paced, each step waits for a line on stdin and is timed from that line to its end; the
script writes "rayrlhf-pace ready" before the first step and "rayrlhf-pace done K" after step K
on stdout. `rayrlhf bench` uses this to run TRL's steps in turn with its own, so that both are
measured over the same minutes of a machine whose speed drifts. It stops at the end of stdin.

Why the settings match ours (rayrlhf `algorithm.estimator=grpo`, `ppo_epochs=1`,
`train_batch_size = prompts_per_step x rollout.n`, KL coefficient 0):
- every step samples N completions for each of P fresh prompts (temperature T, top_p 1, no top_k,
  at most `max_new_tokens` tokens, stopping at EOS) and takes exactly ONE optimizer step over all
  P*N of them: per_device_train_batch_size = P*N, gradient_accumulation_steps = 1,
  steps_per_generation = 1 (so generation_batch_size = P*N) and num_iterations = 1 (no reuse);
- advantages (r - group mean) / group std (`scale_rewards="group"`), the clipped surrogate with
  epsilon 0.2, the loss averaged over all completion tokens of the batch (`loss_type="dapo"`,
  our `loss_agg=token_mean`), beta = 0 so no reference model is loaded;
- fp32 weights, no gradient checkpointing, AdamW with betas (0.9, 0.95), no weight decay, a
  constant learning rate, gradient clipping at 1.0;
- the reward is `rayrlhf.rewards.alphabet` on the decoded completion text;
- no logging, reporting, evaluation or checkpoints, so nothing but the training loop is timed.

Run from the repository root:
    PYTHONPATH=. python benchmarks/trl_grpo.py --model DIR --prompts FILE.jsonl --num-generations 4 \
        --max-new-tokens 8 --prompts-per-step 32 --steps 12 --warmup-steps 2 --lr 1e-3 --seed 0 \
        --threads 1 --output trl_grpo.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path


def fail(message: str) -> None:
    print(f"trl_grpo.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local HF causal-LM directory with its tokenizer")
    parser.add_argument("--prompts", required=True, help='JSONL with a "prompt" field per line')
    parser.add_argument("--num-generations", type=int, required=True, help="samples per prompt (N)")
    parser.add_argument("--max-new-tokens", type=int, required=True, help="response length limit (T)")
    parser.add_argument("--prompts-per-step", type=int, required=True, help="prompts per step (P)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps in all (S)")
    parser.add_argument("--warmup-steps", type=int, required=True, help="untimed first steps (W)")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True, help="torch.set_num_threads")
    parser.add_argument("--output", required=True, help="JSON file for the result")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--paced", action="store_true", help="run each step when stdin says so (see above)")
    args = parser.parse_args()
    if args.num_generations < 2:
        fail(f"--num-generations must be >= 2 (GRPO compares a prompt's samples), got {args.num_generations}")
    for name in ("max_new_tokens", "prompts_per_step", "steps", "threads"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup_steps < args.steps:
        fail(f"--warmup-steps must be in [0, --steps), got {args.warmup_steps} with --steps {args.steps}")
    if args.lr <= 0 or args.temperature <= 0:
        fail(f"--lr and --temperature must be > 0, got {args.lr} and {args.temperature}")
    if not (Path(args.model) / "config.json").is_file():
        fail(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    return args


def load_prompts(path: str, prompts_per_step: int) -> list[dict]:
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        fail(f"--prompts {path}: {err}")
    if not all(isinstance(row, dict) and isinstance(row.get("prompt"), str) for row in rows):
        fail(f'--prompts {path}: every line must be a JSON object with a string "prompt" field')
    if len(rows) < prompts_per_step:
        fail(f"--prompts {path}: {len(rows)} prompts, fewer than --prompts-per-step {prompts_per_step}")
    return rows


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")  # vLLM is not used
    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as err:
        fail(f"TRL is not installed ({err}); pip install trl")
    import torch
    import transformers
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from rayrlhf.rewards import alphabet

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
    rows = load_prompts(args.prompts, args.prompts_per_step)
    fields = sorted({key for row in rows for key in row} - {"prompt"})

    def alphabet_reward(prompts, completions, **kwargs):
        # TRL passes prompts=, completions= (plain strings here) and every dataset column, plus its
        # own extras (trainer_state, log_metric, ...); ours takes only the dataset's columns.
        return alphabet(prompts, completions, **{key: kwargs[key] for key in fields if key in kwargs})

    alphabet_reward.__name__ = "alphabet"

    batch = args.prompts_per_step * args.num_generations
    scratch = tempfile.mkdtemp(prefix="trl_grpo_")
    config = GRPOConfig(
        output_dir=scratch,  # stays empty: no checkpoints, no logs
        use_cpu=True, bf16=False, fp16=False, model_init_kwargs={"dtype": "float32"},
        gradient_checkpointing=False, seed=args.seed, max_steps=args.steps,
        # One optimizer step per generation batch of P*N completions (see the docstring).
        per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=args.num_generations,
        # Sampling as in our rollouts, with transformers generate instead of vLLM.
        use_vllm=False, max_completion_length=args.max_new_tokens, temperature=args.temperature,
        top_p=1.0, top_k=0,
        # The GRPO objective as ours with estimator=grpo, loss_agg=token_mean, kl_coef=0.
        beta=0.0, scale_rewards="group", loss_type="dapo", epsilon=0.2,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, log_completions=False,
    )

    step_seconds: list[float] = []
    started = [0.0]
    paced = args.paced

    def wait_for_turn(message: str) -> None:
        print(f"rayrlhf-pace {message}", flush=True)
        if not sys.stdin.readline():
            sys.exit(0)  # the bench is done with us
        started[0] = time.perf_counter()

    class StepTimer(TrainerCallback):
        """Each step's seconds: from the end of the one before (or its turn, when paced) to its end."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                if paced:
                    wait_for_turn("ready")
                else:
                    started[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            step_seconds.append(now - started[0])
            started[0] = now
            if not paced:
                return
            if state.global_step < state.max_steps:
                wait_for_turn(f"done {state.global_step}")
            else:
                print(f"rayrlhf-pace done {state.global_step}", flush=True)

    trainer = GRPOTrainer(model=args.model, reward_funcs=alphabet_reward, args=config,
                          train_dataset=Dataset.from_list(rows), callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # it would print the end-of-training metrics
    try:
        trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if len(step_seconds) != args.steps:
        fail(f"training stopped after {len(step_seconds)} of {args.steps} steps")

    timed = step_seconds[args.warmup_steps:]
    result = {
        "samples_per_s": len(timed) * batch / sum(timed),
        "seconds_per_step": sum(timed) / len(timed),
        "step_seconds": timed,
        "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations,
        "max_new_tokens": args.max_new_tokens,
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
