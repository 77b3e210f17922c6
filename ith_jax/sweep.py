"""One command for a sweep: the same training run once per value of one config key, then a table.

    python -m ith_jax.sweep --config configs/lm.py:minilm,pitch,audio --workdir runs/sweep_layer \\
        --over fusion_layer=0,middle,last --config.audio.spans=... --config.audio.cache_dir=...
    python -m ith_jax.sweep --config configs/lm.py:minilm,pitch,audio --workdir runs/sweep_clap \\
        --over audio.clap_threshold=0,0.2,0.4,0.6,0.8 --config.audio.selection=first_above ...

Each value trains in ``WORKDIR/<key>=<value>/`` with exactly the command ``python -m ith_jax.train`` would be
given by hand (printed before it runs), as a subprocess: a sweep is resumable like a training (a value whose
run finished is skipped; an interrupted one resumes), and a failing value stops the sweep with its exit status.
``fusion_layer`` also takes ``middle`` (num_hidden_layers // 2) and ``last`` (num_hidden_layers), read from the
text model's checkpoint. The table (one row per value: the best checkpoint's accuracy on every eval file, how many
spans got audio, the fusion gate's mean) is printed and written to ``WORKDIR/sweep.json``.

Every value of one sweep shares one audio cache: the CLAP threshold and the selection rule act at training time
(ith_common/selection.py), so a threshold sweep needs no new audio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ith_common.atomic import atomic_write_text, check_output_dir
from ith_common.config import load_config
from ith_common.errors import UserError, run_main
from ith_jax import model_spec as model_spec_lib
from ith_jax import trainer as trainer_lib

SYMBOLIC_LAYERS = ("middle", "last")


def parse_over(text: str) -> tuple[str, list[str]]:
    """``key=v1,v2,...`` -> (key, [v1, v2, ...])."""
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not items:
        raise UserError(f"--over {text!r}: expected KEY=VALUE,VALUE,... (e.g. fusion_layer=0,middle,last)")
    if len(set(items)) != len(items):
        raise UserError(f"--over {text!r}: a value is repeated")
    return key.strip(), items


def resolve_values(config, key: str, values: list[str]) -> list[str]:
    """Checks that ``key`` exists and turns ``middle``/``last`` into fusion layer numbers."""
    if not trainer_lib.lookup(config, key)[0]:
        raise UserError(f"--over: the config has no key {key!r}" +
                        (" (the audio keys need the `audio` variant)" if key.startswith(("audio", "fusion")) else ""))
    if key != "fusion_layer" or not any(v in SYMBOLIC_LAYERS for v in values):
        return values
    num_layers = model_spec_lib.spec_from_config(config, config.head).bert["num_hidden_layers"]
    named = {"middle": str(num_layers // 2), "last": str(num_layers)}
    resolved = [named.get(v, v) for v in values]
    if len(set(resolved)) != len(resolved):
        raise UserError(f"--over fusion_layer: {','.join(values)} name the same layer twice for a "
                        f"{num_layers}-layer model ({','.join(resolved)})")
    return resolved


def run_dir(workdir: Path, key: str, value: str) -> Path:
    return workdir / f"{key}={value}"


def is_finished(directory: Path, key: str, wanted) -> bool:
    """A run whose final evaluation was written with this very value (so a rerun of the sweep skips it)."""
    if not all((directory / name).is_file() for name in (trainer_lib.EVAL_RESULTS_FILE, trainer_lib.CONFIG_FILE)):
        return False
    present, stored = trainer_lib.lookup(trainer_lib.load_workdir_config(directory), key)
    return present and stored == wanted


def summarise(directory: Path, value: str) -> dict:
    report = json.loads((directory / trainer_lib.EVAL_RESULTS_FILE).read_text())
    return {"value": value, "workdir": str(directory), "best_step": report["best_step"],
            "results": report["results"]}


def format_sweep(key: str, rows: list[dict]) -> str:
    table = {}
    for row in rows:
        for path, metrics in row["results"].items():
            shown = {k: v for k, v in metrics.items() if k != "num_examples"}
            table[f"{key}={row['value']}  {Path(path).parent.name}/{Path(path).name}"] = shown
    return trainer_lib.format_table(table)


def sweep(config_arg: str, workdir: Path, key: str, values: list[str], overrides: list[str]) -> list[dict]:
    config, rest = load_config(["--config", config_arg, *overrides])
    if rest:
        raise UserError(f"unknown arguments: {' '.join(rest)}")
    trainer_lib.validate_config(config)
    values = resolve_values(config, key, values)
    wanted = {}  # every value is checked (and typed, as the trainer will read it) before the first run starts
    for value in values:
        value_config = load_config(["--config", config_arg, *overrides, f"--config.{key}={value}"])[0]
        trainer_lib.validate_config(value_config)
        wanted[value] = trainer_lib.lookup(value_config, key)[1]
    check_output_dir(workdir, what="--workdir")
    rows = []
    for index, value in enumerate(values, 1):
        directory = run_dir(workdir, key, value)
        if is_finished(directory, key, wanted[value]):
            print(f"[{index}/{len(values)}] {key}={value}: finished earlier ({directory}), skipped", flush=True)
        else:
            command = [sys.executable, "-m", "ith_jax.train", "--config", config_arg, "--workdir", str(directory),
                       *overrides, f"--config.{key}={value}"]
            print(f"[{index}/{len(values)}] {key}={value}: {' '.join(command[1:])}", flush=True)
            status = subprocess.run(command).returncode
            if status != 0:
                raise SystemExit(status)
        rows.append(summarise(directory, value))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ith_jax.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="FILE[:variants], as for ith_jax.train")
    parser.add_argument("--workdir", required=True, help="one sub-directory per value goes here")
    parser.add_argument("--over", required=True, metavar="KEY=V1,V2,...", help="the swept key and its values")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise UserError(f"unknown arguments: {' '.join(bad)} (expected --config.KEY=VALUE overrides)")
    key, values = parse_over(args.over)
    if any(o.split("=", 1)[0] == f"--config.{key}" for o in overrides):
        raise UserError(f"--config.{key} is the swept key: give its values with --over only")
    workdir = Path(args.workdir)
    rows = sweep(args.config, workdir, key, values, overrides)
    table = format_sweep(key, rows)
    print(f"\nsweep over {key} (best-dev checkpoint of each run):\n{table}")
    atomic_write_text(workdir / "sweep.json", json.dumps({"key": key, "config": args.config,
                                                          "overrides": overrides, "runs": rows}, indent=2))
    print(f"written: {workdir / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
