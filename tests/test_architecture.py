"""The package map of docs/internals.md, enforced: dependencies between the top-level packages run one way.

    ith_jax ──► ith_common ◄── audio_gen        configs ──► ith_common

The import graph is read from the source (every ``import`` statement, also the ones inside functions), so a lazy
import cannot hide an edge.  What actually gets loaded is checked in fresh interpreters.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ith_common", "ith_jax", "audio_gen", "configs")

# Which of our packages each package may import.
ALLOWED_EDGES = {
    "ith_common": set(),
    "ith_jax": {"ith_common"},
    "audio_gen": {"ith_common"},
    "configs": {"ith_common"},
}
# Third-party modules ith_common may import: the contract modules are numpy + standard library; huggingface_hub
# (the hub resolver) and soundfile (FLAC waveforms in the cache) are imported inside the functions that need them.
COMMON_THIRD_PARTY = {"numpy", "ml_collections", "huggingface_hub", "soundfile"}


def _modules(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, top-level module name) for every absolute import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> ['file:line', ...] (edges between our own packages only)."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for path in _modules(package):
            for line, name in _imports(path):
                if name in PACKAGES and name != package:
                    graph[package].setdefault(name, []).append(f"{path.relative_to(ROOT)}:{line}")
    return graph


def test_packages_import_only_what_the_map_allows():
    graph = _package_graph()
    forbidden = {f"{src} -> {dst}": sites for src, edges in graph.items() for dst, sites in edges.items()
                 if dst not in ALLOWED_EDGES[src]}
    assert not forbidden, f"imports against the package map (docs/internals.md): {forbidden}"


def _find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_between_top_level_packages():
    assert _find_cycle(_package_graph()) is None


def test_cycle_finder_finds_a_cycle():
    # The check above is only as good as the cycle finder: it must see a two-package cycle.
    assert _find_cycle({"a": {"b": []}, "b": {"a": []}, "c": {}}) == ["a", "b", "a"]
    assert _find_cycle({"a": {"b": []}, "b": {}}) is None


def test_ith_common_imports_only_stdlib_numpy_and_ml_collections():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in _modules("ith_common") for line, name in _imports(path)
           if name not in stdlib and name not in COMMON_THIRD_PARTY and name != "ith_common"]
    assert not bad, bad


def _loaded_after_importing(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def _module_names(package: str, *, skip: tuple[str, ...] = ()) -> list[str]:
    names = []
    for path in _modules(package):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in skip and not parts[-1] == "__main__":
            names.append(name)
    return names


def test_ith_jax_never_loads_torch():
    # ith_jax.convert is the one exception: its --check compares against the torch reference (inside a function,
    # so even it does not load torch at import).
    loaded = _loaded_after_importing(_module_names("ith_jax"))
    assert "jax" in loaded  # the check would be empty if nothing was imported
    assert not loaded & {"torch", "transformers", "diffusers"}, sorted(loaded & {"torch", "transformers", "diffusers"})


def test_contract_modules_load_neither_jax_nor_torch():
    loaded = _loaded_after_importing(_module_names("ith_common") + ["configs.gen", "configs.lm", "configs.span"])
    assert "numpy" in loaded
    assert not loaded & {"jax", "flax", "torch", "transformers"}, sorted(loaded & {"jax", "flax", "torch", "transformers"})


@pytest.mark.parametrize("package", ["ith_jax", "audio_gen"])
def test_a_forbidden_edge_would_be_seen(tmp_path, package):
    # The source scan must see a lazy import inside a function body, the kind that hid the old cycle.
    path = tmp_path / "probe.py"
    other = "audio_gen" if package == "ith_jax" else "ith_jax"
    path.write_text(f"def f():\n    from {other}.x import y\n    return y\n")
    assert (2, other) in _imports(path)
