r"""Download AuditoryBench (train and dev splits) from the AudioBERT repository at pinned revisions, checked by sha256.

    python -m ith_jax.data.fetch --out DIR [--base-url URL] [--timeout SECONDS]

writes ``DIR/animal/{train,dev}.csv`` and ``DIR/pitch/{train,dev}.csv``: the layout of
``../shared/data/auditorybench`` and of ``--config.data_dir``, so ``DIR`` can stand in for it.  Each file is fetched
from ``BASE_URL/<commit>/<upstream path>`` (``FILES`` pins both; the default base is GitHub's raw-file host), its
sha256 is compared with the pinned sum, and only a file with the right sum is written (atomically).  A file already
in ``DIR`` with the right sum is skipped without touching the network, so rerunning the command on files placed by
hand checks them offline.  ``--base-url`` points at a mirror (``https://...``) or a local copy (``file:///...``)
laid out the same way.

Errors are one line (``ith_common.errors.run_main``): no network fails at the first file, after at most
``--timeout`` seconds, saying how to place the files by hand; a download whose sum differs names the file, the
expected and the actual sum, and writes nothing.

Why ``urllib.request`` and not ``requests``/``httpx``: four plain GETs of public files, no session, retries or
authentication; the standard library keeps the JAX half free of one more dependency, and it reads ``file://`` URLs,
which the tests use.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from ith_common.atomic import atomic_write_bytes, check_output_dir
from ith_common.errors import UserError, run_main

UPSTREAM_REPO = "HJ-Ok/AudioBERT"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{UPSTREAM_REPO}"
# A dead or firewalled network should fail within seconds; a live one delivers these small files well within it.
DEFAULT_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class DataFile:
    """One split file: where it goes under ``--out``, where it comes from upstream, and its pinned sha256."""

    local: str
    upstream: str
    commit: str
    sha256: str
    rows: int


# The revisions and sums of the copies in ../shared/data/auditorybench (its README lists the same commits).  Only
# animal/dev's commit was found in full; the others are GitHub short commits, which raw.githubusercontent.com
# resolves like full ones.  Older revisions shipped an animal train file identical to the test split: never
# move these pins without checking that.
FILES: tuple[DataFile, ...] = (
    DataFile("animal/train.csv", "dataset/animal_sound_recognition/train.csv", "2e2ff11d",
             "4b673c3b75d02f0d2df5f0927cfff0e28652f2a5097fadd1812f56cb8dabeb8d", 4211),
    DataFile("animal/dev.csv", "dataset/animal_sound_recognition/dev.csv", "1bb2736477f4f08b495b91e24c07b8eefb7808a2",
             "fa12ccac6add3f91ccae6f76294ce52ed8163f166cfddcb4da02f8eb8ce88b16", 592),
    DataFile("pitch/train.csv", "dataset/sound_pitch_comparsion_train.csv", "4fc71aee",
             "8bac045736ba081f09dbbdd37ea2821bd00126baec26f458393a7db24ec02eeb", 8312),
    DataFile("pitch/dev.csv", "dataset/sound_pitch_comparsion_dev.csv", "4fc71aee",
             "2fd28e5f1ea70e678238f35d0dbee9dea1e113f43e28519a62349c94743e8d75", 1178),
)
SPLIT_FILES: tuple[str, ...] = tuple(f.local for f in FILES)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_url(base_url: str, item: DataFile) -> str:
    return f"{base_url.rstrip('/')}/{item.commit}/{item.upstream}"


def by_hand_instructions(out_dir: Path, files: Sequence[DataFile]) -> str:
    """How to place the files without this command (one line, for error messages)."""
    placements = "; ".join(f"{f.upstream} at commit {f.commit} -> {out_dir / f.local}" for f in files)
    return (f"place the files by hand: on a connected machine download them from https://github.com/{UPSTREAM_REPO} "
            f"({placements}), copy them there, and rerun this command to check their sha256 sums (docs/data.md)")


def _download(url: str, timeout: float, item: DataFile, out_dir: Path, files: Sequence[DataFile]) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:  # the server answered: a wrong pin or a mirror without the file
        raise UserError(f"{item.local}: {url} answered HTTP {error.code} ({error.reason}); expected the file "
                        f"{item.upstream} at commit {item.commit}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", None) or error
        if url.startswith("file:"):  # a local mirror: no network involved, the layout is what is wrong
            raise UserError(f"{item.local}: cannot read {url} ({reason}); expected a local mirror laid out as "
                            "BASE/<commit>/<upstream path>") from None
        raise UserError(f"{item.local}: cannot download {url} ({reason}); no network? "
                        + by_hand_instructions(out_dir, files)) from None


@dataclasses.dataclass
class FetchReport:
    """What ``fetch_auditorybench`` did with each file (``local`` names)."""

    downloaded: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)


def fetch_auditorybench(out_dir, *, base_url: str = DEFAULT_BASE_URL, timeout: float = DEFAULT_TIMEOUT_S,
                        files: Sequence[DataFile] = FILES, log: Callable[[str], None] | None = None) -> FetchReport:
    """Download every file of ``files`` into ``out_dir`` (see the module docstring); returns what was done.

    A file is written only when its sha256 is the pinned one; the first failure raises ``UserError`` and leaves the
    files already verified in place (a rerun skips them)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    out_dir = check_output_dir(out_dir, what="--out")
    scheme = base_url.split(":", 1)[0].lower() if ":" in base_url else ""
    if scheme not in ("http", "https", "file"):
        raise UserError(f"--base-url: expected an http://, https:// or file:// URL, got {base_url!r}")
    if timeout <= 0:
        raise UserError(f"--timeout: expected a number of seconds > 0, got {timeout}")
    report = FetchReport()
    for item in files:
        target = out_dir / item.local
        if target.is_file() and sha256_of(target.read_bytes()) == item.sha256:
            log(f"{target}: present, sha256 matches; skipped")
            report.skipped.append(item.local)
            continue
        url = file_url(base_url, item)
        data = _download(url, timeout, item, out_dir, files)
        actual = sha256_of(data)
        if actual != item.sha256:
            raise UserError(f"{item.local}: sha256 of {url} is {actual}, expected {item.sha256}; not written "
                            "(a changed or truncated upstream file, or a mirror of another revision)")
        replaced = " (replaced a file with another sum)" if target.exists() else ""
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
        log(f"{target}: downloaded {len(data):,} bytes, sha256 ok{replaced}")
        report.downloaded.append(item.local)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ith_jax.data.fetch",
                                     description="Download AuditoryBench (train, dev) at pinned revisions, "
                                                 "checked by sha256.")
    parser.add_argument("--out", required=True, help="directory to write animal/ and pitch/ into")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help=f"where BASE/<commit>/<upstream path> is fetched from (default {DEFAULT_BASE_URL}; "
                             "a mirror or file:///path)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds to wait for a connection or data (default {DEFAULT_TIMEOUT_S:g})")
    args = parser.parse_args(argv)
    report = fetch_auditorybench(args.out, base_url=args.base_url, timeout=args.timeout)
    print(f"{args.out}: {len(report.downloaded)} downloaded, {len(report.skipped)} already present; "
          "all sha256 sums match")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
