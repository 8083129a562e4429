"""`rayrlhf {train,sft,rm,dpo,pipeline,bench} --config conf/FILE.yaml [key=value ...]` and
`rayrlhf serve-rm --model PATH`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rayrlhf.errors import Interrupted, RayRLHFError

DEFAULT_CONFIG = "conf/tiny_ppo.yaml"
COMMANDS = {"train": "run PPO (or a critic-free relative)",
            "sft": "supervised fine-tuning on (prompt, response) data",
            "rm": "reward-model training on (prompt, chosen, rejected) pairs",
            "dpo": "direct preference optimisation (or IPO, hinge, cDPO, SimPO) on (prompt, chosen, "
                   "rejected) pairs",
            "pipeline": "SFT, then reward model, then PPO (or SFT, then DPO), in one output directory",
            "bench": "throughput per stage, sweeps, and TRL's GRPOTrainer on the same point"}
PRESETS = {"train": DEFAULT_CONFIG, "bench": "conf/bench_cpu.yaml", "dpo": "conf/tiny_dpo.yaml"}


def _default_config(command: str) -> Path:
    """The command's tiny preset in the working directory, else the one beside the package source."""
    name = PRESETS.get(command, "conf/tiny_pipeline.yaml")
    local = Path(name)
    return local if local.exists() else Path(__file__).resolve().parent.parent / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayrlhf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        cmd = commands.add_parser(name, help=help_text)
        cmd.add_argument("--config", type=Path, default=None,
                         help=f"YAML preset (default: {_default_config(name).name} from conf/)")
        cmd.add_argument("overrides", nargs="*", metavar="key=value")
    serve_cmd = commands.add_parser("serve-rm", help="serve a reward model over HTTP")
    serve_cmd.add_argument("--model", required=True, help="HF sequence-classification reward model")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--token", default=os.environ.get("RAYRLHF_REWARD_TOKEN", ""),
                           help="require 'Authorization: Bearer TOKEN' (default: $RAYRLHF_REWARD_TOKEN)")
    serve_cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve_cmd.add_argument("--micro-batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "serve-rm":
        return _serve_rm(args)
    try:
        message = _run(args.command, args.config or _default_config(args.command), args.overrides)
    except Interrupted as err:
        print(f"rayrlhf: {err}", file=sys.stderr)
        return 128 + err.signum
    except RayRLHFError as err:
        # Raised inside an actor, it arrives wrapped in Ray's task error; print only the cause.
        cause = getattr(err, "cause", None)
        print(f"rayrlhf: error: {cause if isinstance(cause, RayRLHFError) else err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rayrlhf: interrupted again before the step ended; actors stopped, no checkpoint saved",
              file=sys.stderr)
        return 130
    print(message)
    return 0


def _run(command: str, config: Path, overrides: list[str]) -> str:
    """Runs the command; returns the closing line."""
    from rayrlhf.config import load_config

    cfg = load_config(config, overrides, stage=None if command == "pipeline" else
                      {"train": "ppo", "bench": "ppo"}.get(command, command))
    if command == "train":
        from rayrlhf.driver import train

        history = train(cfg)
        return (f"done: {len(history)} steps, reward/mean {history[-1]['reward/mean']:.3f}, "
                f"outputs in {cfg.output_dir}")
    if command == "pipeline":
        from rayrlhf.pipeline import run_pipeline

        summary = run_pipeline(cfg)
    elif command == "bench":
        from rayrlhf.bench import run_bench

        report = run_bench(cfg)
        keys = ("model/parameters", "ours/samples_per_s", "trl/samples_per_s", "ratio_vs_trl",
                "unattributed_frac")
        summary = {k: report[k] for k in keys}
        if report["ratio_vs_trl"] is not None:
            summary["ratio_vs_trl/median_step"] = report["ratio_vs_trl/median_step"]
        summary["weight_sync/times_memcpy"] = report["weight_sync"]["times_memcpy"]
        summary |= {f"growth/{k}": v for k, v in report["growth"].items()}
    else:
        from rayrlhf.supervised import train_supervised

        summary = train_supervised(command, cfg)
    lines = [f"  {k:<22} {v:.4f}" if isinstance(v, float) else f"  {k:<22} {v}" for k, v in summary.items()]
    return "\n".join([f"done: {command}, outputs in {cfg.output_dir}", *lines])


def _serve_rm(args) -> int:
    from rayrlhf.reward_server import serve

    if not os.path.exists(args.model):
        print(f"rayrlhf: error: reward model '{args.model}' does not exist", file=sys.stderr)
        return 2
    serve(args.model, args.host, args.port, args.token, args.dtype, args.micro_batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
