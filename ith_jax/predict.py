"""Predict the masked word of sentences with a trained workdir (or the spans a span detector finds).

    python -m ith_jax.predict --workdir W [--span-workdir S] [--task pitch|animal] [--json]
                              [--imagine --gen-config "configs/gen.py:VARIANT --config.KEY=VALUE ..."]
                              "A cow's moo has a [MASK] pitch than a bird's chirp." [SENTENCE ...]

Prints, per sentence, the answer, its probability and the alternatives', and for an ITH workdir the spans
used and whether each got audio; ``--json`` prints the records of docs/api.md instead (one JSON list). The
library behind it is ``ith_jax.load`` (``ith_jax.api``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ith_common.errors import run_main


def format_record(record: dict) -> str:
    lines = [record["sentence"]]
    if record["kind"] == "span":
        found = ", ".join(f"{s['text']!r} [{s['start']}:{s['end']}]" for s in record["spans"]) or "none"
        return "\n".join(lines + [f"  spans: {found}"])
    others = "  ".join(f"{a['answer']} {a['probability']:.3f}" for a in record["alternatives"][1:])
    lines.append(f"  -> {record['prediction']} ({record['probability']:.3f})" + (f"   others: {others}" if others
                                                                                else ""))
    if record["answer"] is not None:
        lines[-1] += f"   answer: {record['answer']} ({'right' if record['correct'] else 'wrong'})"
    for span in record["spans"]:
        lines.append(f"  span {span['text']!r} [{span['start']}:{span['end']}]: "
                     + ("audio" if span["has_audio"] else "no audio"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ith_jax.predict", description=__doc__.split("\n")[0])
    parser.add_argument("sentences", nargs="+", metavar="SENTENCE", help="a sentence with one [MASK]")
    parser.add_argument("--workdir", required=True, help="a trained workdir (text-only, ITH or span detector)")
    parser.add_argument("--span-workdir", default=None, help="ITH: the span detector that finds the spans")
    parser.add_argument("--task", choices=("pitch", "animal"), default=None, help="default: the workdir's")
    parser.add_argument("--step", type=int, default=None, help="a periodic checkpoint instead of the best")
    parser.add_argument("--cache-dir", default=None, help="ITH: the audio cache (default: the workdir's)")
    parser.add_argument("--imagine", action="store_true",
                        help="ITH: generate the prompts the cache lacks (python -m audio_gen.build_cache)")
    parser.add_argument("--gen-config", default=None,
                        help="with --imagine: build_cache's arguments the cache was built with")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    args = parser.parse_args(argv)

    from ith_jax import api, trainer

    trainer.setup_logging()
    if trainer.load_workdir_config(Path(args.workdir)).head != "span":
        api.check_sentences(args.sentences)  # before the model is restored
    predictor = api.load(args.workdir, step=args.step, span_workdir=args.span_workdir, cache_dir=args.cache_dir,
                         imagine=args.imagine, gen_config=args.gen_config)
    records = predictor.predict(args.sentences, task=args.task)
    if args.json:
        print(json.dumps(api.strict_json(records), indent=2, ensure_ascii=False))
    else:
        print(f"{predictor.workdir} ({predictor.kind}, step {predictor.step})")
        print("\n".join(format_record(r) for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
