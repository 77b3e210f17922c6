"""The report's figures as PNG files (matplotlib, the non-interactive Agg backend): accuracy bars, training
curves, the CLAP score histogram.  Each function writes one file and returns nothing; the page links the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ith_common.errors import UserError

TEXT_COLOR, ITH_COLOR, MAJORITY_COLOR = "#64748b", "#ea580c", "#cbd5e1"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("the report draws its figures with matplotlib: pip install 'ith-jax[report]'") from None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110})
    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")
    fig.clear()
    import matplotlib.pyplot as plt
    plt.close(fig)


def accuracy_bars(path: Path, labels: Sequence[str], majority: Sequence[float], text: Sequence[float],
                  ith: Sequence[float]) -> None:
    """Grouped bars per evaluated file: majority class, text-only, ITH (accuracy in %)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.9 * len(labels) + 1.5), 3.2))
    width = 0.26
    for offset, values, name, color in ((-width, majority, "majority class", MAJORITY_COLOR),
                                        (0.0, text, "text-only", TEXT_COLOR), (width, ith, "ITH", ITH_COLOR)):
        bars = ax.bar([i + offset for i in range(len(labels))], [100 * v for v in values], width, label=name,
                      color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False, fontsize=8)
    _save(fig, path)


def training_curves(path: Path, title: str, runs: Sequence[tuple[str, str, list[dict], list[dict]]]) -> None:
    """Training loss (left) and every dev accuracy (right) against the step; `runs` are (label, kind, train
    lines, dev lines) of metrics.jsonl."""
    plt = _pyplot()
    fig, (loss_ax, dev_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    for label, kind, train, dev in runs:
        color = ITH_COLOR if kind == "ith" else TEXT_COLOR
        if train:
            loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, label=label, lw=1.2)
        keys = sorted({k for r in dev for k in r if k.startswith("dev/") and k.endswith("/accuracy")})
        for style, key in zip(("-", "--", ":", "-."), keys):
            points = [(r["step"], 100 * r[key]) for r in dev if isinstance(r.get(key), (int, float))]
            dev_ax.plot(*zip(*points), style, marker="o", ms=3.5, color=color,
                        label=f"{label} {key.split('/')[1]}")
    loss_ax.set(title=f"{title}: training loss", xlabel="step", ylabel="loss")
    if loss_ax.lines and all(min(line.get_ydata()) > 0 for line in loss_ax.lines):
        loss_ax.set_yscale("log")  # the first steps' loss is often 10x the rest: a linear axis flattens the rest
    dev_ax.set(title=f"{title}: dev accuracy", xlabel="step", ylabel="accuracy (%)")
    for ax in (loss_ax, dev_ax):
        if ax.lines:
            ax.legend(frameon=False, fontsize=7)
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="#94a3b8")
    _save(fig, path)


def clap_histogram(path: Path, title: str, edges: Sequence[float], counts: Sequence[int],
                   thresholds: Sequence[float], selection_threshold: float | None) -> None:
    """The cache's CLAP scores (every candidate) as bars over [-1, 1], the acceptance thresholds as thin lines and
    the ITH run's own threshold as a thick one."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 2.9))
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, widths, align="edge", color="#0ea5e9", edgecolor="white", lw=0.5)
    for threshold in thresholds:
        ax.axvline(threshold, color="#94a3b8", lw=0.8, ls=":")
    if selection_threshold is not None:
        ax.axvline(selection_threshold, color=ITH_COLOR, lw=2, label=f"ITH threshold {selection_threshold:g}")
        ax.legend(frameon=False, fontsize=8)
    ax.set(title=title, xlabel="CLAP score (cosine similarity, text vs clip)", ylabel="candidates", xlim=(-1, 1))
    _save(fig, path)
