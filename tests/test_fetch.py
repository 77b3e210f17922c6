"""`python -m ith_jax.data.fetch`: downloads from local mirrors (file:// and a real local HTTP server), the pinned
sha256 sums, skipping verified files offline, and the one-line errors (wrong sum, no network, bad URL)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ith_common.errors import UserError
from ith_jax.data.fetch import FILES, SPLIT_FILES, DataFile, fetch_auditorybench, file_url
from tests.trainer_utils import REPO

CONTENTS = {name: f"sentence,answer,span1,span2\nrow of {name},lower,a,b\n".encode() for name in SPLIT_FILES}


def table_for(contents=CONTENTS) -> tuple[DataFile, ...]:
    """FILES with the sums of ``contents`` (the real sums need the real files, which these tests do not assume)."""
    return tuple(DataFile(f.local, f.upstream, f.commit, hashlib.sha256(contents[f.local]).hexdigest(), 1)
                 for f in FILES)


def make_mirror(root: Path, contents: dict[str, bytes], files=FILES) -> Path:
    """``root/<commit>/<upstream path>``: the layout of raw.githubusercontent.com/HJ-Ok/AudioBERT."""
    for item in files:
        path = root / item.commit / item.upstream
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[item.local])
    return root


def closed_port() -> int:
    """A local TCP port nobody listens on: a connection there is refused at once, like a machine without network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_fetch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ith_jax.data.fetch", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_pinned_table_matches_the_shared_copies(data_dir):
    """The constants are the sums of ../shared/data/auditorybench, computed here independently with hashlib."""
    assert SPLIT_FILES == ("animal/train.csv", "animal/dev.csv", "pitch/train.csv", "pitch/dev.csv")
    for item in FILES:
        data = (data_dir / item.local).read_bytes()
        assert hashlib.sha256(data).hexdigest() == item.sha256, item.local
        assert data.count(b"\n") - 1 >= item.rows  # rows <= lines - header (quoted newlines add lines)
    assert file_url("https://raw.githubusercontent.com/HJ-Ok/AudioBERT/", FILES[1]) == (
        "https://raw.githubusercontent.com/HJ-Ok/AudioBERT/1bb2736477f4f08b495b91e24c07b8eefb7808a2/"
        "dataset/animal_sound_recognition/dev.csv")


def test_cli_fetches_the_real_files_from_a_file_url_and_a_rerun_skips_them(data_dir, tmp_path):
    mirror = make_mirror(tmp_path / "mirror", {f.local: (data_dir / f.local).read_bytes() for f in FILES})
    out = tmp_path / "out"
    result = run_fetch("--out", str(out), "--base-url", mirror.as_uri())
    assert result.returncode == 0, result.stderr
    assert "4 downloaded, 0 already present" in result.stdout
    for name in SPLIT_FILES:
        assert (out / name).read_bytes() == (data_dir / name).read_bytes()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(SPLIT_FILES)
    # Offline now (a refused port): the verified files are skipped without a single request.
    result = run_fetch("--out", str(out), "--base-url", f"http://127.0.0.1:{closed_port()}")
    assert result.returncode == 0, result.stderr
    assert "0 downloaded, 4 already present" in result.stdout


def test_library_fetch_over_a_local_http_server(tmp_path):
    """A real HTTP round trip (urllib against http.server), then a 404 for a file the mirror lacks."""
    files = table_for()
    mirror = make_mirror(tmp_path / "mirror", CONTENTS)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        lines = []
        report = fetch_auditorybench(tmp_path / "out", base_url=base, files=files, log=lines.append)
        assert report.downloaded == list(SPLIT_FILES) and report.skipped == []
        assert {n: (tmp_path / "out" / n).read_bytes() for n in SPLIT_FILES} == CONTENTS
        assert len(lines) == 4 and all("sha256 ok" in line for line in lines)

        (mirror / files[2].commit / files[2].upstream).unlink()
        with pytest.raises(UserError, match=r"^pitch/train\.csv: .*answered HTTP 404"):
            fetch_auditorybench(tmp_path / "out2", base_url=base, files=files, log=lambda _: None)
        # The two files before it were verified and kept; the missing one and the one after were not written.
        assert [n for n in SPLIT_FILES if (tmp_path / "out2" / n).exists()] == ["animal/train.csv", "animal/dev.csv"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_wrong_sum_is_one_line_naming_file_and_sums_and_nothing_is_written(tmp_path):
    """The CLI with the real pinned sums against a mirror of other bytes: the first file already mismatches."""
    mirror = make_mirror(tmp_path / "mirror", CONTENTS)
    out = tmp_path / "out"
    result = run_fetch("--out", str(out), "--base-url", mirror.as_uri())
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    actual = hashlib.sha256(CONTENTS["animal/train.csv"]).hexdigest()
    assert lines[0].startswith("error: animal/train.csv: sha256 of file://")
    assert f"is {actual}, expected {FILES[0].sha256}; not written" in lines[0]
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_no_network_fails_at_once_and_says_how_to_place_the_files(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_fetch("--out", str(out), "--base-url", f"http://127.0.0.1:{closed_port()}")
    assert time.monotonic() - started < 30  # a Python start-up plus one refused connection
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: animal/train.csv: cannot download http://127.0.0.1:")
    assert "no network? place the files by hand" in lines[0]
    for item in FILES:  # every file's upstream path, commit and destination
        assert f"{item.upstream} at commit {item.commit} -> {out / item.local}" in lines[0]
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_a_silent_server_times_out_after_the_timeout(tmp_path):
    """A host that accepts connections and never answers (a black-holing proxy) costs --timeout, not minutes."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads or writes
        started = time.monotonic()
        with pytest.raises(UserError, match="timed out.*place the files by hand"):
            fetch_auditorybench(tmp_path / "out", base_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                                timeout=1.0, files=table_for(), log=lambda _: None)
        assert time.monotonic() - started < 10


def test_verified_files_are_skipped_and_a_wrong_local_file_is_replaced(tmp_path):
    files = table_for()
    mirror = make_mirror(tmp_path / "mirror", CONTENTS)
    out = tmp_path / "out"
    fetch_auditorybench(out, base_url=mirror.as_uri(), files=files, log=lambda _: None)
    (out / "pitch/dev.csv").write_bytes(b"edited by hand\n")
    before = os.stat(out / "animal/train.csv").st_mtime_ns
    lines = []
    report = fetch_auditorybench(out, base_url=mirror.as_uri(), files=files, log=lines.append)
    assert report.skipped == ["animal/train.csv", "animal/dev.csv", "pitch/train.csv"]
    assert report.downloaded == ["pitch/dev.csv"]
    assert "replaced a file with another sum" in lines[-1]
    assert (out / "pitch/dev.csv").read_bytes() == CONTENTS["pitch/dev.csv"]
    assert os.stat(out / "animal/train.csv").st_mtime_ns == before


@pytest.mark.parametrize("args, expected", [
    (["--base-url", "ftp://example.org/x"], "error: --base-url: expected an http://, https:// or file:// URL"),
    (["--base-url", "raw.githubusercontent.com/HJ-Ok/AudioBERT"], "error: --base-url: expected an http://"),
    (["--timeout", "0"], "error: --timeout: expected a number of seconds > 0, got 0.0"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, expected):
    result = run_fetch("--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(expected), result.stderr
    assert not (tmp_path / "out").exists()


def test_an_out_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_fetch("--out", str(tmp_path / "file"), "--base-url", (tmp_path / "mirror").as_uri())
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --out {tmp_path / 'file'} is a file; expected a directory"


def test_a_file_mirror_without_the_layout_names_it(tmp_path):
    (tmp_path / "mirror").mkdir()
    result = run_fetch("--out", str(tmp_path / "out"), "--base-url", (tmp_path / "mirror").as_uri())
    assert result.returncode == 2
    assert "expected a local mirror laid out as BASE/<commit>/<upstream path>" in result.stderr
