"""``python -m ith_jax.pipeline --config configs/pipeline.py[:variant] --workdir DIR [--config.key=value ...]
[--dry-run]``: the thin entry point of `ith_jax.pipeline` (docs/pipeline.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ith_common.config import load_config
from ith_common.errors import run_main
from ith_jax.pipeline.plan import build_plan
from ith_jax.pipeline.runner import run_pipeline


def main(argv: list[str] | None = None) -> int:
    config, rest = load_config(sys.argv[1:] if argv is None else argv, default="configs/pipeline.py:demo")
    parser = argparse.ArgumentParser(prog="python -m ith_jax.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="every stage's outputs go under this folder")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (what runs, what is skipped) only")
    args = parser.parse_args(rest)
    plan = build_plan(config, Path(args.workdir))
    run_pipeline(plan, eta_defaults=dict(config.eta_seconds), dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
