"""The ``STAGE_DONE.json`` record of a finished step and the digest that decides whether it is still valid.

A step's digest is the sha256 of its command (as typed: ``python -m ...``, so another interpreter path does not
invalidate it), the sha256 of every input file, and the output identity (`output_identity`) of the steps whose
outputs it reads.  A step is
done when its record holds the same digest and its outputs pass the step's cheap check.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

from ith_common.atomic import atomic_write_text

SCHEMA_VERSION = 1
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def step_digest(command: list[str], inputs: list[Path], upstream: dict[str, str]) -> tuple[str, dict] | None:
    """(digest, what went into it), or None while an input file does not exist yet."""
    hashed = {}
    for path in inputs:
        if not path.is_file():
            return None
        hashed[str(path)] = sha256_file(path)
    material = {"command": command, "inputs": hashed, "upstream": upstream}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest(), material


def output_identity(record: dict) -> str:
    """What a dependent step's digest takes from this step: its outputs' facts (sha256 of output files, a
    training's final step and results, a cache's entry count), so a rerun that wrote the same outputs again lets
    its dependents skip, and one that wrote other outputs makes them run."""
    facts = record.get("facts") or {"digest": record.get("digest")}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def read_record(path: Path) -> dict | None:
    """The record, or None when absent or unreadable (a record is only ever written whole, atomically)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("schema_version") == SCHEMA_VERSION else None


def write_record(path: Path, *, step: str, digest: str, material: dict, seconds: float, facts: dict) -> None:
    record = {"schema_version": SCHEMA_VERSION, "step": step, "digest": digest, "seconds": round(seconds, 1),
              "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "facts": facts, **material}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
