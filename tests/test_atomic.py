"""The one atomic writer: old-or-new content, never a mix, and the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from ith_common.atomic import atomic_output, atomic_write_bytes, check_output_file
from ith_common.errors import UserError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        with open(tmp_path / "plain.json", "wb") as handle:  # what the writer must match
            handle.write(b"{}")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "plain.json") == 0o666 & ~umask


def test_a_replaced_file_keeps_its_mode_and_gets_the_new_content(tmp_path):
    target = tmp_path / "results.json"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "manifest.jsonl"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed halfway")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]


def test_output_checks_name_the_problem_before_any_work(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        check_output_file(tmp_path / "dir", what="--out")
    with pytest.raises(UserError, match="does not exist"):
        check_output_file(tmp_path / "missing" / "x.json", what="--json")
    assert check_output_file(tmp_path / "ok.json") == tmp_path / "ok.json"
