"""Runs a pipeline plan: says what it will run and skip, runs each step's command as a subprocess with a log,
keeps an ETA, and prints the accuracy table at the end.

Skipping is decided twice: once for the printed plan (a step whose upstream will rerun is planned to run), and
again just before each step, when the upstream outputs are final (a rerun that reproduced the same outputs lets
its dependents skip).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from ith_common.atomic import atomic_write_text, check_output_dir
from ith_common.errors import UserError
from ith_jax.pipeline.plan import PYTHON, Plan, Step
from ith_jax.pipeline.records import output_identity, read_record, step_digest, write_record

HEARTBEAT_SECONDS = 60.0


class StageFailed(UserError):
    """A child command failed: one line naming the step, its log and its exit status, which the pipeline exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ------------------------------------------------------------------------------------------------ deciding

def decide(step: Step, identities: dict[str, str], rerun: set[str]) -> tuple[bool, str]:
    """(run?, why).  ``identities`` holds the output identities of the steps before this one; ``rerun`` the names
    of upstream steps that will run (their outputs are not final yet)."""
    if changed := [name for name in step.after if name in rerun]:
        return True, f"after {', '.join(changed)}"
    record = read_record(step.record_path)
    if record is None:
        return True, "not done yet"
    computed = step_digest(step.command, step.inputs, {name: identities.get(name, "") for name in step.after})
    if computed is None or computed[0] != record.get("digest"):
        return True, "command or inputs changed"
    if problem := step.check(step, record):
        return True, f"output check failed: {problem}"
    return False, "done"


# ------------------------------------------------------------------------------------------------ ETA

class Estimator:
    """Seconds per step: a fixed start-up cost plus seconds per unit of work (training steps, rows, prompts),
    from the config's defaults until a step of the same kind has run here; then from what it measured."""

    def __init__(self, defaults: dict[str, float]):
        self.defaults = dict(defaults)
        self.startup = float(self.defaults.pop("startup", 0.0))
        self.measured: dict[str, list[tuple[float, float]]] = {}

    def _default_rate(self, kind: str) -> float:
        return float(self.defaults.get(kind, self.defaults.get(kind.split(":")[0], 0.0)))

    def seconds(self, step: Step) -> float:
        if runs := self.measured.get(step.kind):
            work, seconds = sum(w for w, _ in runs), sum(s for _, s in runs)
            return self.startup + step.work * max(seconds - self.startup * len(runs), 0.0) / max(work, 1e-9)
        return self.startup + step.work * self._default_rate(step.kind)

    def record(self, step: Step, seconds: float) -> None:
        self.measured.setdefault(step.kind, []).append((step.work, seconds))

    def unmeasured(self, steps: list[Step]) -> int:
        return len({s.kind for s in steps if s.kind not in self.measured})


# ------------------------------------------------------------------------------------------------ running

def _interpreter_command(command: list[str]) -> list[str]:
    return [sys.executable, *command[1:]] if command and command[0] == PYTHON else command


def _last_line(log: Path, limit: int = 300) -> str:
    """The child's last meaningful line: its ``error:`` line when there is one, else the last non-empty one."""
    try:
        with open(log, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 8192, 0))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [part.strip() for line in text.splitlines() for part in line.split("\r") if part.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1][:limit]


def run_child(step: Step, log: Path, prefix: str) -> float:
    """Runs the step's command with its output in ``log``; returns the seconds it took or raises StageFailed."""
    started = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {step.shell}\n")
        out.flush()
        if step.in_process is not None:
            step.in_process(step)
            return time.monotonic() - started
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        child = subprocess.Popen(_interpreter_command(step.command), stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            next_beat = started + HEARTBEAT_SECONDS
            while child.poll() is None:
                time.sleep(0.5)
                if time.monotonic() >= next_beat:
                    next_beat += HEARTBEAT_SECONDS
                    print(f"{prefix} running {format_seconds(time.monotonic() - started)}: {_last_line(log, 120)}",
                          flush=True)
        except KeyboardInterrupt:
            # Ctrl-C reaches the child too (same process group): give it time to stop cleanly (both training and
            # the cache resume on a rerun); a pipeline interrupted on its own passes the signal on.
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)
                child.wait()
            raise
    if child.returncode != 0:
        status = child.returncode if child.returncode > 0 else 128 - child.returncode
        raise StageFailed(f"stage {step.name} failed with exit status {status} (log: {log}): {_last_line(log)}",
                          status)
    return time.monotonic() - started


def write_commands(plan: Plan) -> Path:
    """Every step's command in order, as a script a user can read or run by hand."""
    lines = ["#!/bin/sh", f"# The commands of python -m ith_jax.pipeline for {plan.workdir}, in order.", "set -e"]
    for step in plan.steps:
        lines.append(f"# {step.name}" + (" (done by the pipeline itself)" if step.in_process else ""))
        lines.append(("# " if step.in_process else "") + step.shell)
    path = plan.workdir / "commands.sh"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run_pipeline(plan: Plan, *, eta_defaults: dict[str, float], dry_run: bool = False) -> dict:
    """Prints the plan, runs what is not done, and returns the accuracy summary (also in WORKDIR/accuracy.json)."""
    check_output_dir(plan.workdir, what="--workdir")
    plan.workdir.mkdir(parents=True, exist_ok=True)
    identities: dict[str, str] = {}
    planned: dict[str, tuple[bool, str]] = {}
    rerun: set[str] = set()
    for step in plan.steps:
        planned[step.name] = decide(step, identities, rerun)
        if planned[step.name][0]:
            rerun.add(step.name)
        elif record := read_record(step.record_path):
            identities[step.name] = output_identity(record)
    commands = write_commands(plan)
    print(f"pipeline {plan.workdir}: {len(plan.steps)} steps, {len(rerun)} to run, "
          f"{len(plan.steps) - len(rerun)} to skip; data {plan.data_dir}"
          + (f" ({plan.data_label})" if plan.data_label else "") + f"; commands in {commands}", flush=True)
    if plan.data_reason:
        print(f"  note: {plan.data_reason}", flush=True)
    width = max(len(s.name) for s in plan.steps)
    for step in plan.steps:
        run, why = planned[step.name]
        print(f"  {'run ' if run else 'skip'}  {step.name:<{width}}  {why}", flush=True)
    if dry_run:
        return {}

    estimator = Estimator(eta_defaults)
    if to_run := [s for s in plan.steps if planned[s.name][0]]:
        print(f"estimated time: {format_seconds(sum(estimator.seconds(s) for s in to_run))} (rough: from the "
              "config's eta_seconds until a step of each kind has run here)", flush=True)
    started = time.monotonic()
    identities = {}
    for index, step in enumerate(plan.steps, 1):
        prefix = f"[{index}/{len(plan.steps)}] {step.name}"
        run, why = decide(step, identities, set())
        if not run:
            identities[step.name] = output_identity(read_record(step.record_path))
            if planned[step.name][0]:
                print(f"{prefix}: skipped, {why} (its inputs came out unchanged)", flush=True)
            continue
        log = plan.workdir / "logs" / f"{step.name.replace(':', '_')}.log"
        print(f"{prefix} started ({why}); log {log}\n    $ {step.shell}", flush=True)
        step.record_path.unlink(missing_ok=True)  # a step that dies half-way must not look done
        for path in [step.out_dir, *step.outputs.values()]:
            path.parent.mkdir(parents=True, exist_ok=True)  # the children write into existing folders only
        seconds = run_child(step, log, prefix)
        estimator.record(step, seconds)
        digest, material = step_digest(step.command, step.inputs, {n: identities.get(n, "") for n in step.after})
        facts = step.facts(step)
        write_record(step.record_path, step=step.name, digest=digest, material=material, seconds=seconds,
                     facts=facts)
        identities[step.name] = output_identity({"facts": facts, "digest": digest})
        remaining = [s for s in plan.steps[index:] if planned[s.name][0]]
        eta = sum(estimator.seconds(s) for s in remaining)
        rough = estimator.unmeasured(remaining)
        print(f"{prefix} done in {format_seconds(seconds)}; elapsed {format_seconds(time.monotonic() - started)}"
              + (f"; ETA {format_seconds(eta)} for {len(remaining)} more step(s)"
                 + (f" (rough: {rough} kind(s) of step not measured yet)" if rough else "") if remaining else ""),
              flush=True)
    summary = accuracy_summary(plan)
    atomic_write_text(plan.workdir / "accuracy.json", json.dumps(summary, indent=2) + "\n")
    print("\n" + format_accuracy(summary))
    print(f"\nreport: {plan.workdir / 'report' / 'index.html'}")
    return summary


# ------------------------------------------------------------------------------------------------ the table

def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def accuracy_summary(plan: Plan) -> dict:
    by_name = {s.name: s for s in plan.steps}
    rows = []
    for evaluation in plan.evaluations:
        results = {k: json.loads(by_name[evaluation[k]].outputs["results"].read_text()) for k in ("text", "ith")}
        answers: dict[str, Counter] = {}
        for record in _predictions(by_name[evaluation["text"]].outputs["predictions"]):
            answers.setdefault(record["file"], Counter())[record["answer"]] += 1
        for path in evaluation["files"]:
            counts = answers.get(path, Counter())
            rows.append({
                "task": evaluation["task"], "file": path,
                "examples": results["text"]["results"][path].get("num_examples"),
                "majority": max(counts.values()) / sum(counts.values()) if counts else None,
                "text": results["text"]["results"][path]["accuracy"],
                "ith": results["ith"]["results"][path]["accuracy"],
                "audio": ("ORACLE " if evaluation["oracle"] else "") + evaluation["audio"],
                "oracle": evaluation["oracle"]})
    return {"workdir": str(plan.workdir), "data": str(plan.data_dir), "data_label": plan.data_label, "rows": rows,
            "report": str(plan.workdir / "report" / "index.html")}


def format_accuracy(summary: dict) -> str:
    header = ("task", "file", "examples", "majority", "text-only", "ITH", "audio")
    table = [header] + [(r["task"], r["file"], str(r["examples"]),
                         "-" if r["majority"] is None else f"{100 * r['majority']:.2f}%",
                         f"{100 * r['text']:.2f}%", f"{100 * r['ith']:.2f}%", r["audio"]) for r in summary["rows"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = "Accuracy (best-dev checkpoints)"
    if label := summary["data_label"]:
        title += f" -- {label.upper() if 'synthetic' in label else label}"
    notes = [f"ORACLE: {r['task']} audio is tones fitted to the labelled comparisons (a ceiling, not a result)"
             for r in summary["rows"] if r["oracle"]]
    if "synthetic" in summary["data_label"]:
        notes.append("SYNTHETIC SAMPLE: generated data, not AuditoryBench; the numbers say nothing about the paper")
    return "\n".join([title, *lines, *sorted(set(notes))])
