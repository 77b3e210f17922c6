"""Tiny trained workdirs shared by tests/test_api.py, tests/test_export.py and tests/test_evaluate_predictions.py.

Built once per pytest session (a marker file under the session's base temp directory, so the three modules reuse
one set), through the real commands: the small pitch file, its gold span manifest and a tone cache
(``tests.test_audio_data.build_inputs``), then three ``ith_jax.train`` runs side by side (text-only LM, ITH LM,
span detector), then ``ith_jax.evaluate --predictions`` for the text-only and the ITH workdir (the latter with
``--compare`` the text-only one: its file must hold the ITH workdir's records only).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_audio_data import build_inputs
from tests.trainer_utils import REPO, subprocess_env, train_command

FUSED = "configs/lm.py:tiny,pitch,audio"


def _data(path: Path) -> tuple[str, ...]:
    return (f"--config.train_files={path}", f"--config.dev_files={path}", f"--config.eval_files={path}")


def evaluate_command(*args) -> list[str]:
    return [sys.executable, "-m", "ith_jax.evaluate", *map(str, args)]


def shared_workdirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.getbasetemp() / "api_workdirs"
    done = root / "done.json"
    if done.is_file():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    inputs = build_inputs(root / "inputs")
    data = inputs["data"]
    paths = {"data": data, "manifest": inputs["manifest"], "cache": inputs["cache"], "root": root,
             "text": root / "text", "ith": root / "ith", "span": root / "span"}
    commands = [
        train_command(paths["text"], *_data(data), config="configs/lm.py:tiny,pitch"),
        train_command(paths["ith"], *_data(data), f"--config.audio.spans={inputs['manifest']}",
                      f"--config.audio.cache_dir={inputs['cache']}", "--config.audio.selection=first", config=FUSED),
        # A 2-step span detector: its spans are whatever it finds; the tests compare paths, not quality.
        train_command(paths["span"], *_data(data), config="configs/span.py:tiny"),
    ]
    _run_all(commands)
    paths["text_predictions"] = root / "text.jsonl"
    paths["text_json"] = root / "text.json"
    paths["ith_predictions"] = root / "ith.jsonl"
    paths["ith_json"] = root / "ith.json"
    _run_all([evaluate_command("--workdir", paths[kind], "--data", data, *extra, "--predictions",
                               paths[f"{kind}_predictions"], "--json", paths[f"{kind}_json"])
              for kind, extra in (("text", ()), ("ith", ("--spans", inputs["manifest"], "--compare", paths["text"])))])
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def _run_all(commands: list[list[str]]) -> None:
    """The commands side by side (each is mostly single-threaded start-up and compilation)."""
    procs = [subprocess.Popen(c, cwd=REPO, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
