"""The case-study HTML report: text-only vs ITH accuracy, training curves, the audio cache's CLAP scores and a
sample of examples with their spans' imagined audio and the fusion gate per token (docs/report.md).

    python -m ith_jax.report --out DIR --predictions TEXT.jsonl ITH.jsonl [...]

`build_report` is the library call; `inputs` reads and checks what the report shows, `plots` draws the figures.
"""

from ith_jax.report.build import build_report

__all__ = ["build_report"]
