"""What the interleaved A/B benchmarks (train_layouts.py, weight_load.py) share: the command line
and the JSON report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(doc: str, script: str, extra: dict[str, dict] | None = None) -> argparse.Namespace:
    """--config, --rounds, --output and overrides; `extra` adds the script's own options."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--config", required=True)
    for flag, options in (extra or {}).items():
        parser.add_argument(flag, **options)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--output", default="", help="JSON file for the result")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    if args.rounds < 2:
        sys.exit(f"{script}: error: --rounds must be >= 2 (the first is a warm-up)")
    return args


def report(result: dict, output: str) -> None:
    """Prints the result, and writes it to `output` when one is given."""
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
