"""Command-line loading of ml_collections config files: ``--config path[:variant]`` plus overrides.

Mirrors what ``ml_collections.config_flags`` does, without absl flags (whose global flag registry does not mix
with the entry points' argparse options), so that every entry point (the JAX trainer, the evaluator, and the
torch sidecar's ``build_cache``) parses configs the same way.  Only public ml_collections API is used.

    python -m ith_jax.train --config configs/lm.py:minilm --config.batch_size=16 --config.eval_files='("a.csv",)'
    python -m ith_common.config --config configs/lm.py:minilm     # prints the resolved config

Config files choose their variants with `parse_variants`: comma-separated names, each from a named group;
two names from one group (``lm.py:tiny,minilm``) and unknown names are errors.

Override values are parsed as Python literals when they look like one and checked against the type of the
default; ``--config.key value`` (space-separated) works as well. Unknown keys are an error.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from ith_common.errors import UserError, run_main

__all__ = ["load_config", "load_config_file", "apply_override", "config_to_json", "parse_variants"]


def parse_variants(arg: str | None, groups: dict[str, tuple[str, ...]], *, config: str) -> dict[str, str | None]:
    """``'minilm,animal'`` with groups ``{"size": ("base", "minilm"), "task": ("pitch", "animal")}`` ->
    ``{"size": "minilm", "task": "animal"}``; a group not named maps to None.  Order-free.

    ``config`` names the config file in messages.  Unknown names and two names of one group are `UserError`s.
    """
    chosen: dict[str, str | None] = {group: None for group in groups}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        group = next((g for g, names in groups.items() if part in names), None)
        if group is None:
            known = ", ".join(name for names in groups.values() for name in names)
            raise UserError(f"{config}: unknown variant {part!r} (known: {known})")
        if chosen[group] is not None and chosen[group] != part:
            raise UserError(f"{config}: variants {chosen[group]!r} and {part!r} conflict "
                            f"(choose one {group}: {', '.join(groups[group])})")
        chosen[group] = part
    return chosen


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:variant]`` by calling its ``get_config(variant)``."""
    path_text, _, variant = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"config file {path_text} does not exist (expected e.g. configs/lm.py or configs/lm.py:tiny)")
    module_name = f"_ith_config_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path_text} defines no get_config(arg) function")
    config = module.get_config(variant or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"{path_text}: get_config must return an ml_collections.ConfigDict")
    return config


def _parse_literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return text


def _coerce(key: str, raw: str, current: Any, field_type: type | None) -> Any:
    """Turns the override text into a value of the default's type (or raises a UserError saying which)."""
    expected = field_type if field_type is not None else (type(current) if current is not None else None)
    if expected is None:
        return _parse_literal(raw)
    if expected is str:
        return raw
    if expected is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UserError(f"--config.{key}={raw}: expected true or false")
    value = _parse_literal(raw)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (tuple, list):
        if isinstance(value, (tuple, list)):
            return expected(value)
        if isinstance(value, str):  # a single bare string for a tuple of strings: `--config.eval_files=a.csv`
            return expected(v for v in value.split(",") if v)
        return expected([value])
    if expected is int and isinstance(value, bool):
        raise UserError(f"--config.{key}={raw}: expected an integer")
    if not isinstance(value, expected):
        raise UserError(f"--config.{key}={raw}: expected a value of type {expected.__name__}")
    return value


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, raw: str) -> None:
    node = config
    parts = dotted_key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise UserError(f"unknown config key --config.{'.'.join(parts[: depth + 1])}")
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        known = ", ".join(sorted(node.keys()))
        raise UserError(f"unknown config key --config.{dotted_key} (known keys here: {known})")
    current = node[leaf]
    field_type = node.get_type(leaf)
    if field_type is type(None):
        field_type = None
    if isinstance(current, ml_collections.ConfigDict):
        raise UserError(f"--config.{dotted_key} is a group; set one of its keys instead")
    value = _coerce(dotted_key, raw, current, field_type)
    with node.unlocked():
        node[leaf] = value


def load_config(argv: Sequence[str], *, default: str | None = None) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Parses ``--config`` and ``--config.*`` out of argv; returns the config and the remaining arguments."""
    argv = list(argv)
    spec = default
    overrides: list[tuple[str, str]] = []
    remaining: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise UserError("--config needs a value: path/to/config.py[:variant]")
                spec = argv[i + 1]
                i += 2
            else:
                spec = arg.split("=", 1)[1]
                i += 1
            continue
        if arg.startswith("--config."):
            key_and_value = arg[len("--config."):]
            if "=" in key_and_value:
                key, raw = key_and_value.split("=", 1)
                i += 1
            else:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value")
                key, raw = key_and_value, argv[i + 1]
                i += 2
            overrides.append((key, raw))
            continue
        remaining.append(arg)
        i += 1
    if spec is None:
        raise UserError("missing --config path/to/config.py[:variant]")
    config = load_config_file(spec)
    config.lock()  # unknown keys become errors
    for key, raw in overrides:
        apply_override(config, key, raw)
    return config, remaining


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def main(argv: Sequence[str] | None = None) -> int:
    config, rest = load_config(sys.argv[1:] if argv is None else argv)
    if rest:
        raise UserError(f"unexpected arguments: {' '.join(rest)}")
    print(config_to_json(config))
    return 0


if __name__ == "__main__":  # python -m ith_common.config --config ... : prints the resolved config
    sys.exit(run_main(main))
