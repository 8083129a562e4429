"""`rayrlhf train --config conf/FILE.yaml [key=value ...]` and `rayrlhf serve-rm --model PATH`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rayrlhf.errors import Interrupted, RayRLHFError

DEFAULT_CONFIG = "conf/tiny_ppo.yaml"


def _default_config() -> Path:
    """conf/tiny_ppo.yaml in the working directory, else the one beside the package source."""
    local = Path(DEFAULT_CONFIG)
    return local if local.exists() else Path(__file__).resolve().parent.parent / DEFAULT_CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayrlhf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="run PPO")
    train_cmd.add_argument("--config", type=Path, default=None,
                           help=f"YAML preset (default: {DEFAULT_CONFIG})")
    train_cmd.add_argument("overrides", nargs="*", metavar="key=value")
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

    from rayrlhf.config import load_config

    try:
        cfg = load_config(args.config or _default_config(), args.overrides)
        from rayrlhf.driver import train

        history = train(cfg)
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
    last = history[-1]
    print(f"done: {len(history)} steps, reward/mean {last['reward/mean']:.3f}, "
          f"outputs in {cfg.output_dir}")
    return 0


def _serve_rm(args) -> int:
    from rayrlhf.reward_server import serve

    if not os.path.exists(args.model):
        print(f"rayrlhf: error: reward model '{args.model}' does not exist", file=sys.stderr)
        return 2
    serve(args.model, args.host, args.port, args.token, args.dtype, args.micro_batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
