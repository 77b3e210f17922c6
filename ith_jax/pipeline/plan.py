"""From a pipeline config (configs/pipeline.py) to the list of steps: each one command with its inputs and outputs.

Every child config named in the pipeline config is loaded here with its overrides (``ith_common.config``, the
loader the children use), so a wrong key or value is one error line before any work, and the step counts behind
the ETA come from the same resolved values the child will use.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shlex
from pathlib import Path
from typing import Any, Callable

import ml_collections

from ith_common.atomic import atomic_write_text
from ith_common.cache import verify as verify_cache
from ith_common.config import apply_override, load_config_file
from ith_common.errors import UserError
from ith_common.manifest import read_manifest
from ith_jax.data.synthetic import DEFAULT_ROWS_PER_SPLIT, is_synthetic
from ith_jax.pipeline.records import sha256_file

TASKS = ("pitch", "animal")
STAGES = ("data", "span", "detect", "build_cache", "lm_text", "lm_ith", "evaluate", "report")
SELECTIONS = ("first_above", "best", "first")
SPAN_SOURCES = ("detected", "gold")  # the span detector's, or the CSV's gold spans (ith_jax.detect --gold)
DONE_NAME = "STAGE_DONE.json"
SUBSET_NOTE = "SUBSET.json"


@dataclasses.dataclass
class Step:
    """One command of the pipeline.

    ``inputs``: files whose sha256 enter the step's digest; ``after``: steps whose outputs it reads (their
    digests enter too, and a step that reruns makes its dependents rerun); ``check(step, record)`` says, cheaply,
    whether the outputs are there and whole (None) or what is wrong; ``facts(step)`` is stored in the record after
    a run, for the check.  ``work``/``kind``: units of work for the ETA (training steps, rows, prompts).
    """

    name: str
    stage: str
    command: list[str]  # as a user types it: "python -m ..."
    out_dir: Path  # holds the record STAGE_DONE.json
    inputs: list[Path]
    after: list[str]
    check: Callable[["Step", dict], str | None]
    facts: Callable[["Step"], dict] = lambda step: {}
    work: float = 1.0
    kind: str = ""
    outputs: dict[str, Path] = dataclasses.field(default_factory=dict)
    in_process: Callable[["Step"], None] | None = None  # a step this process does itself (the data subset)
    record: Path | None = None  # where the record goes when not out_dir/STAGE_DONE.json

    @property
    def record_path(self) -> Path:
        return self.record or self.out_dir / DONE_NAME

    @property
    def shell(self) -> str:
        return shlex.join(self.command)


@dataclasses.dataclass
class Plan:
    workdir: Path
    data_dir: Path
    data_label: str  # "" for AuditoryBench as configured, else "synthetic sample" / "first N rows"
    steps: list[Step]
    evaluations: list[dict]  # {"task", "files", "text": step name, "ith": step name, "oracle": bool}
    config: ml_collections.ConfigDict
    data_reason: str = ""  # why the data is not the configured folder


# ------------------------------------------------------------------------------------------------ config

def _flat(overrides: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in overrides.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _text(value: Any) -> str:
    """A value as ``--config.key=`` text that ith_common.config parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def child_config(spec: str, overrides: dict[str, Any], *, where: str) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Loads a child's config as the child will (file, variant, overrides) and returns it with the overrides as
    ``--config.key=value`` arguments.  Errors name the pipeline key they came from."""
    try:
        config = load_config_file(spec)
        config.lock()
        args = []
        for key, value in overrides.items():
            apply_override(config, key, _text(value))
            args.append(f"--config.{key}={_text(value)}")
    except (UserError, ValueError) as error:
        raise UserError(f"pipeline config {where} ({spec}): {error}") from None
    return config, args


def check_config(c: ml_collections.ConfigDict) -> None:
    """The pipeline's own keys (the child configs are checked by loading them)."""
    if not c.tasks or any(t not in TASKS for t in c.tasks) or len(set(c.tasks)) != len(c.tasks):
        raise UserError(f"pipeline config key 'tasks': expected distinct names from {', '.join(TASKS)}, got "
                        f"{tuple(c.tasks)!r}")
    if not c.eval_files:
        raise UserError("pipeline config key 'eval_files': expected at least one file like '{task}/dev.csv'")
    if c.synthetic_rows_per_split < 0:
        raise UserError("pipeline config key 'synthetic_rows_per_split': expected >= 0, got "
                        f"{c.synthetic_rows_per_split}")
    for task, splits in c.subset_rows.items():
        for split, rows in splits.items():
            if not isinstance(rows, int) or rows < 0:
                raise UserError(f"pipeline config key 'subset_rows.{task}.{split}': expected a row count >= 0, "
                                f"got {rows!r}")
    for task in c.tasks:
        audio = c.audio[task]
        if audio.selection not in SELECTIONS:
            raise UserError(f"pipeline config key 'audio.{task}.selection': expected one of {', '.join(SELECTIONS)}, "
                            f"got {audio.selection!r}")
        if audio.spans not in SPAN_SOURCES:
            raise UserError(f"pipeline config key 'audio.{task}.spans': expected one of {', '.join(SPAN_SOURCES)}, "
                            f"got {audio.spans!r}")
        if audio.oracle_pitch_table and task != "pitch":
            raise UserError(f"pipeline config key 'audio.{task}.oracle_pitch_table': the ORACLE pitch table is fitted "
                            "to pitch comparisons; only audio.pitch can use it")


# ------------------------------------------------------------------------------------------------ data

def count_rows(path: Path) -> int:
    """Data rows of a CSV (records, not lines: quoted fields may hold newlines)."""
    with open(path, newline="", encoding="utf-8") as f:
        return max(sum(1 for _ in csv.reader(f)) - 1, 0)


def write_subset(source: Path, target: Path, files: list[str], rows: dict[str, int]) -> None:
    """The first ``rows[name]`` data rows of every file (all where not given; header kept), records copied as
    csv reads them."""
    for name in files:
        limit = rows.get(name, 0)
        with open(source / name, newline="", encoding="utf-8") as f:
            records = list(csv.reader(f))
        kept = records if not limit else records[: limit + 1]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(kept)
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target / name, buffer.getvalue())
    note = {"source": str(source), "rows": {k: v for k, v in rows.items() if v}, "files": files,
            "note": "a subset of AuditoryBench: the first rows of each file"}
    atomic_write_text(target / SUBSET_NOTE, json.dumps(note, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ checks

def _sha_fact(*names: str) -> Callable[[Step], dict]:
    """Facts: the sha256 of the named outputs, compared again by `check_files`."""
    return lambda step: {"sha256": {n: sha256_file(step.outputs[n]) for n in names}}


def check_files(step: Step, record: dict) -> str | None:
    """The outputs hold the bytes recorded when the step ran (data, pitch table, evaluation, report)."""
    for name, digest in record.get("facts", {}).get("sha256", {}).items():
        path = step.outputs[name]
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} changed since the step ran"
    return None


def check_workdir(step: Step, record: dict) -> str | None:
    """A finished training: eval_results.json, the best checkpoint and the final step's checkpoint."""
    workdir = step.outputs["workdir"]
    results = workdir / "eval_results.json"
    try:
        summary = json.loads(results.read_text())
        best, final = int(summary["best_step"]), int(summary["final_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{results} is missing or unreadable (the training did not finish)"
    for directory in (workdir / "best" / str(best), workdir / "checkpoints" / str(final)):
        if not (directory / "state").is_dir():
            return f"{directory}/state is missing"
    expected = record.get("facts", {}).get("final_step")
    if expected is not None and final != expected:
        return f"{results}: final step {final}, the step ran to {expected}"
    return None


def workdir_facts(step: Step) -> dict:
    results = step.outputs["workdir"] / "eval_results.json"
    return {"final_step": json.loads(results.read_text())["final_step"], "eval_results_sha256": sha256_file(results)}


def check_manifest(step: Step, record: dict) -> str | None:
    try:
        records = read_manifest(step.outputs["manifest"])
    except UserError as error:
        return str(error)
    sources = {r["source"] for r in records}
    missing = [str(f) for f in step.inputs if f.suffix == ".csv" and str(f) not in sources]
    if missing:
        return f"{step.outputs['manifest']} covers no row of {', '.join(missing)}"
    if len(records) != (wrote := record.get("facts", {}).get("records")):
        return f"{step.outputs['manifest']}: {len(records)} records, the step wrote {wrote}"
    return None


def manifest_facts(step: Step) -> dict:
    return {"records": len(read_manifest(step.outputs["manifest"]))}


def check_cache(step: Step, record: dict) -> str | None:
    """`python -m audio_gen.cache verify`'s library call (numpy only), plus the entry count the build left."""
    try:
        report = verify_cache(step.outputs["cache"])
    except UserError as error:
        return str(error)
    if not report.ok:
        return f"{step.outputs['cache']}: {report.problems[0]}"
    if report.entries != (left := record.get("facts", {}).get("entries")):
        return f"{step.outputs['cache']}: {report.entries} entries, the build left {left}"
    return None


def cache_facts(step: Step) -> dict:
    # The stored clips count too: the report plays them, so a rebuild that adds them must rerun it.
    report = verify_cache(step.outputs["cache"])
    return {"entries": report.entries, "waveforms": report.waveforms}


# ------------------------------------------------------------------------------------------------ the plan

PYTHON = "python"  # commands are shown and recorded as typed; the runner substitutes this interpreter


def _config_files(spec: str) -> list[Path]:
    """The config file of a ``path[:variant]`` spec, and configs/common.py beside it when it uses it."""
    path = Path(spec.partition(":")[0])
    common = path.parent / "common.py"
    return [path] + ([common] if common.is_file() and "common" in path.read_text() else [])


class RowCounter:
    """Data rows per file for the ETA, also before the data step has written the files: a subset file has
    min(source rows, limit), a synthetic one the rows per split it will be written with."""

    def __init__(self, data_dir: Path, source: Path | None = None, limits: dict[str, int] | None = None,
                 synthetic_rows: int = 0):
        self.data_dir, self.source, self.limits, self.synthetic_rows = data_dir, source, limits or {}, synthetic_rows

    def __call__(self, path: Path) -> int:
        if path.is_file():
            return count_rows(path)
        if self.synthetic_rows:
            return self.synthetic_rows
        if self.source is not None:
            name = path.relative_to(self.data_dir).as_posix()
            rows = count_rows(self.source / name) if (self.source / name).is_file() else 0
            return min(rows, self.limits[name]) if self.limits.get(name) else rows
        return 0

    def files(self, paths: list[Path]) -> int:
        return sum(self(p) for p in paths)

    def training_steps(self, config: ml_collections.ConfigDict, task: str | None) -> int:
        rows = 0
        for template in config.train_files:
            count = self(self.data_dir / template.format(task=task or config.task))
            rows += min(count, config.max_train_examples) if config.max_train_examples else count
        steps = math.ceil(rows / config.batch_size) * config.num_epochs
        return min(steps, config.max_steps) if config.max_steps else steps


def build_plan(c: ml_collections.ConfigDict, workdir: Path) -> Plan:
    check_config(c)
    w = Path(workdir)
    steps: list[Step] = []
    source = Path(c.data_dir) if c.data_dir else None
    subset = {f"{t}/{s}.csv": n for t, splits in c.subset_rows.items() for s, n in splits.items() if n}

    # ---- data: the configured AuditoryBench, a row subset of it, or the synthetic sample
    if source is None or not (source.is_dir() and all((source / t / "train.csv").is_file() for t in c.tasks)):
        data_dir, label = w / "data", "synthetic sample"
        per_split = c.synthetic_rows_per_split
        command = [PYTHON, "-m", "ith_jax.data.synthetic", "--out", str(data_dir)] + (
            ["--rows-per-split", str(per_split)] if per_split else [])
        rows = RowCounter(data_dir, synthetic_rows=per_split or DEFAULT_ROWS_PER_SPLIT)
        steps.append(Step("data", "data", command, data_dir, [], [], check_files, kind="data",
                          outputs={f"{t}/{s}": data_dir / t / f"{s}.csv" for t in TASKS for s in ("train", "dev")}))
        steps[-1].facts = _sha_fact(*steps[-1].outputs)
        data_reason = (f"AuditoryBench not found at {c.data_dir}: the synthetic sample instead" if c.data_dir
                       else "data_dir is empty: the synthetic sample")
    elif subset:
        data_dir = w / "data"
        label = "subset: first " + ", ".join(f"{n} rows of {name}" for name, n in subset.items())
        names = [f"{t}/{s}.csv" for t in TASKS for s in ("train", "dev") if (source / t / f"{s}.csv").is_file()]
        # Not a command of its own: shown (and digested) with every limit, so another subset is another digest.
        limits = ", ".join(f"{n} {subset.get(n, 'all')}" for n in names)
        shown = [PYTHON, "-c", f"# the first rows of each file ({limits}) from {source} into {data_dir}"]
        step = Step("data", "data", shown, data_dir, [source / n for n in names], [], check_files, kind="data",
                    outputs={n: data_dir / n for n in names},
                    in_process=lambda s, names=names: write_subset(source, data_dir, names, subset))
        step.facts = _sha_fact(*step.outputs)
        steps.append(step)
        data_reason = ""
        rows = RowCounter(data_dir, source, subset)
    else:
        data_dir, label, data_reason = source, "", ""
        rows = RowCounter(data_dir)
    data_after = [s.name for s in steps]

    def data_files(templates, task) -> list[Path]:
        return [data_dir / t.format(task=task) for t in templates]

    # ---- span detector (unless every task takes the gold spans)
    span_config, span_args = child_config(c.span.config, _flat(c.span.overrides), where="span")
    span_files = sorted({*data_files(span_config.train_files, None), *data_files(span_config.dev_files, None)})
    detector_needed = any(c.audio[t].spans == "detected" for t in c.tasks)
    steps.extend([Step(
        "span", "span", [PYTHON, "-m", "ith_jax.train", "--config", c.span.config, "--workdir", str(w / "span"),
                         f"--config.data_dir={data_dir}", *span_args],
        w / "span", span_files + _config_files(c.span.config), data_after, check_workdir, workdir_facts,
        work=rows.training_steps(span_config, "both"), kind="train", outputs={"workdir": w / "span"})]
        if detector_needed else [])

    evaluations = []
    for task in c.tasks:
        audio = c.audio[task]
        lm_shared = _flat(c.lm.overrides)
        text_spec, ith_spec = c.lm.text_config.format(task=task), c.lm.ith_config.format(task=task)
        manifest = w / "manifests" / task / "spans.jsonl"
        cache_dir = w / "cache" / task / "audio"
        text_config, text_args = child_config(text_spec, {**lm_shared, **_flat(c.lm.text_overrides)},
                                              where="lm.text_config")
        ith_audio = {"audio.spans": str(manifest), "audio.cache_dir": str(cache_dir),
                     "audio.selection": audio.selection, "audio.clap_threshold": audio.clap_threshold}
        ith_config, ith_args = child_config(ith_spec, {**lm_shared, **_flat(c.lm.ith_overrides), **ith_audio},
                                            where="lm.ith_config")
        if "audio" not in ith_config:
            raise UserError(f"pipeline config key 'lm.ith_config': {ith_spec} has no audio keys "
                            "(add the audio variant)")
        eval_files = data_files(c.eval_files, task)
        detect_files = sorted({*data_files(ith_config.train_files, task), *data_files(ith_config.dev_files, task),
                               *data_files(ith_config.eval_files, task), *eval_files})

        # ---- detection over every file the ITH LM and the evaluation read
        gold = audio.spans == "gold"
        detect = Step(f"detect:{task}", "detect",
                      [PYTHON, "-m", "ith_jax.detect", *(["--gold"] if gold else ["--workdir", str(w / "span")]),
                       *[a for f in detect_files for a in ("--data", str(f))], "--out", str(manifest)],
                      manifest.parent, detect_files, data_after + ([] if gold else ["span"]), check_manifest,
                      manifest_facts,
                      work=rows.files(detect_files), kind="detect:gold" if gold else "detect",
                      outputs={"manifest": manifest})
        steps.append(detect)

        # ---- audio: an ORACLE pitch table first where configured, then the cache
        gen_overrides = _flat(audio.gen_overrides)
        cache_after, cache_inputs = [detect.name], [manifest]
        if audio.oracle_pitch_table:
            table = w / "cache" / task / "pitch_table" / "oracle_pitch.json"
            labelled = sorted({*data_files(ith_config.train_files, task), *data_files(ith_config.dev_files, task)})
            table_step = Step(f"pitch_table:{task}", "build_cache",
                              [PYTHON, "-m", "audio_gen.pitch_table", "--data", *map(str, labelled),
                               "--out", str(table)],
                              table.parent, labelled, data_after, check_files, kind="pitch_table",
                              outputs={"table": table})
            table_step.facts = _sha_fact("table")
            steps.append(table_step)
            gen_overrides["tone_frequencies"] = str(table)
            cache_after.append(table_step.name)
            cache_inputs.append(table)
        gen_config, gen_args = child_config(audio.gen_config, gen_overrides, where=f"audio.{task}")
        oracle = bool(gen_config.oracle)
        steps.append(Step(
            f"build_cache:{task}", "build_cache",
            [PYTHON, "-m", "audio_gen.build_cache", "--config", audio.gen_config, f"--config.spans={manifest}",
             f"--config.cache_dir={cache_dir}", *gen_args],
            cache_dir.parent, cache_inputs + _config_files(audio.gen_config), cache_after, check_cache, cache_facts,
            work=rows.files(detect_files), kind=f"build_cache:{audio.gen_config}", outputs={"cache": cache_dir}))

        # ---- the two LMs
        for kind, spec, args, config, after, inputs in (
                ("text", text_spec, text_args, text_config, data_after, []),
                ("ith", ith_spec, ith_args, ith_config, [detect.name, f"build_cache:{task}"], [manifest])):
            lm_dir = w / f"lm_{kind}" / task
            lm_files = sorted({*data_files(config.train_files, task), *data_files(config.dev_files, task),
                               *data_files(config.eval_files, task)})
            steps.append(Step(
                f"lm_{kind}:{task}", f"lm_{kind}",
                [PYTHON, "-m", "ith_jax.train", "--config", spec, "--workdir", str(lm_dir),
                 f"--config.data_dir={data_dir}", *args],
                lm_dir, lm_files + inputs + _config_files(spec), after, check_workdir, workdir_facts,
                work=rows.training_steps(config, task), kind="train", outputs={"workdir": lm_dir}))

        # ---- evaluation with per-example predictions
        names = {}
        for kind in ("text", "ith"):
            out = w / "eval" / f"{kind}_{task}"
            command = [PYTHON, "-m", "ith_jax.evaluate", "--workdir", str(w / f"lm_{kind}" / task),
                       *[a for f in eval_files for a in ("--data", str(f))]]
            if kind == "ith":
                command += ["--spans", str(manifest)]
            command += ["--json", str(out / "results.json"), "--predictions", str(out / "predictions.jsonl")]
            step = Step(f"evaluate:{kind}:{task}", "evaluate", command, out,
                        eval_files + ([manifest] if kind == "ith" else []), [f"lm_{kind}:{task}"], check_files,
                        work=rows.files(eval_files), kind="evaluate",
                        outputs={"results": out / "results.json", "predictions": out / "predictions.jsonl"})
            step.facts = _sha_fact("results", "predictions")
            steps.append(step)
            names[kind] = step.name
        evaluations.append({"task": task, "files": [str(f) for f in eval_files], "oracle": oracle,
                            "audio": audio.gen_config + (", gold spans" if gold else ""), **names})

    # ---- the report
    by_name = {s.name: s for s in steps}
    report = report_command(
        w / "report",
        [(by_name[e["text"]].outputs["predictions"], by_name[e["ith"]].outputs["predictions"]) for e in evaluations],
        caches=[w / "cache" / e["task"] / "audio" for e in evaluations],
        notes=report_notes(label, evaluations))
    report_inputs = [by_name[e[k]].outputs["predictions"] for e in evaluations for k in ("text", "ith")]
    steps.append(Step("report", "report", report, w / "report", report_inputs,
                      [e[k] for e in evaluations for k in ("text", "ith")], check_files, _sha_fact("index"),
                      kind="report", outputs={"index": w / "report" / "index.html"},
                      # The report replaces its folder as a whole and refuses foreign files in it.
                      record=w / f"report.{DONE_NAME}"))
    # Stage by stage (every detection before any cache, ...), tasks in the configured order within a stage.
    steps.sort(key=lambda s: STAGES.index(s.stage))
    if not label and is_synthetic(data_dir):
        label = "synthetic sample"
    return Plan(w, data_dir, label, steps, evaluations, c, data_reason)


def report_notes(data_label: str, evaluations: list[dict]) -> list[str]:
    notes = []
    if data_label:
        notes.append(f"Data: {data_label}; these numbers say nothing about AuditoryBench's published ones."
                     if data_label == "synthetic sample" else f"Data: AuditoryBench, {data_label}.")
    for e in evaluations:
        if e["oracle"]:
            notes.append(f"{e['task']}: ORACLE audio (tones fitted to the labelled comparisons carry the answers): "
                         "a ceiling for the fusion, not a result about imagined audio.")
    return notes


def report_command(out: Path, predictions: list[tuple[Path, Path]], *, caches: list[Path],
                   notes: list[str]) -> list[str]:
    """``python -m ith_jax.report`` (ith_jax/report/__main__.py): one --predictions pair per task; the training
    curves come from the predictions' own workdirs."""
    command = [PYTHON, "-m", "ith_jax.report", "--out", str(out)]
    for text, ith in predictions:
        command += ["--predictions", str(text), str(ith)]
    for cache in caches:
        command += ["--cache", str(cache)]
    for note in notes:
        command += ["--note", note]
    return command
