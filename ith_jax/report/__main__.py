"""Write the case-study HTML report (docs/report.md).

    python -m ith_jax.report --out DIR/report --predictions TEXT.jsonl ITH.jsonl [--predictions T2 I2 ...]
        [--text-workdir W_TEXT ...] [--ith-workdir W_ITH ...] [--cache CACHE_DIR ...]
        [--sample N] [--seed S] [--thresholds 0,0.2,...] [--title T] [--note TEXT ...]
"""

from __future__ import annotations

import argparse
import sys

from ith_common.errors import UserError, run_main
from ith_jax.report import build_report


def _thresholds(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ith_jax.report", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the report folder (index.html + assets/), replaced as a whole")
    parser.add_argument("--predictions", nargs=2, action="append", required=True, metavar=("TEXT", "ITH"),
                        help="per-example predictions (evaluate --predictions) of the text-only and the ITH workdir "
                             "on one data file; repeat per file/task")
    parser.add_argument("--text-workdir", action="append", default=[],
                        help="training curves from this text-only workdir (repeatable; default: the predictions' own)")
    parser.add_argument("--ith-workdir", action="append", default=[],
                        help="training curves from this ITH workdir (repeatable; default: the predictions' own)")
    parser.add_argument("--cache", action="append", default=[],
                        help="audio cache for CLAP scores and clips (repeatable; default: the ITH workdirs' caches)")
    parser.add_argument("--sample", type=int, default=4,
                        help="examples per group (ITH fixed, ITH broke, others) per data file (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example sample")
    parser.add_argument("--thresholds", type=_thresholds, default=None,
                        help="CLAP thresholds of the acceptance table (default 0,0.2,0.4,0.6,0.8)")
    parser.add_argument("--title", default="Imagine to Hear: case study")
    parser.add_argument("--note", action="append", default=[], help="a line shown at the top (repeatable)")
    args = parser.parse_args(argv)
    if args.sample < 0:
        raise UserError(f"--sample: expected a number >= 0, got {args.sample}")
    extra = {"thresholds": args.thresholds} if args.thresholds else {}
    index = build_report(args.out, [tuple(pair) for pair in args.predictions], text_workdirs=args.text_workdir,
                         ith_workdirs=args.ith_workdir, caches=args.cache, sample=args.sample, seed=args.seed,
                         title=args.title, notes=args.note, **extra)
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
