"""Where the sidecar's pretrained components come from: a local directory, a Hugging Face hub id, or a tiny
random-init stand-in.

Every loader of the sidecar (Stable Audio, CLAP, AST) goes through `load_component`, so a real checkpoint
and the offline test's tiny one take exactly the same code path (`from_pretrained` on a directory).

- ``"tiny:<name>"`` builds (once, atomically) or reuses a tiny random-init checkpoint from `audio_gen.tiny`
  and loads it from its directory; hub ids cannot contain ``:``, so the prefix is unambiguous.
- An existing directory is loaded as is.
- Anything that looks like a filesystem path (starts with ``/``, ``.``, ``~`` or has an OS separator beyond
  the one ``owner/name`` slash) but does not exist is an error, not a hub lookup.
- Otherwise it is a hub id; with ``HF_HUB_OFFLINE=1`` only the local hub cache is consulted, and a failure
  says how to point at a local copy.

`checkpoint_identity` gives what goes into the cache fingerprint for a checkpoint: its hub revision when it
came from the hub cache, plus a digest of its config files and weight-file sizes/edges, so that the same
weights copied to another directory give the same cache key.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any, Callable

from audio_gen.errors import AudioGenError

TINY_PREFIX = "tiny:"

# Files that define a checkpoint's architecture and preprocessing; hashed in full.
_CONFIG_SUFFIXES = (".json", ".txt", ".model")
# Weight files are large: only their size and first/last MiB enter the identity digest (see module doc).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
_EDGE_BYTES = 1 << 20


def _looks_like_path(source: str) -> bool:
    if source.startswith(("/", ".", "~")) or "\\" in source:
        return True
    return source.count("/") > 1


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(source: str, what: str) -> str:
    """Turns a config value into something `from_pretrained` accepts (a directory or a hub id)."""
    if not isinstance(source, str) or not source.strip():
        raise AudioGenError(f"{what}: expected a local checkpoint directory, a hub id or tiny:<name>, got {source!r}")
    source = source.strip()
    if source.startswith(TINY_PREFIX):
        from audio_gen import tiny  # imported lazily: it pulls in diffusers

        return str(tiny.ensure_tiny_checkpoint(source[len(TINY_PREFIX):]))
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise AudioGenError(f"{what}: {source} is a file; expected a checkpoint directory (with config.json) "
                            "or a hub id")
    if _looks_like_path(source):
        raise AudioGenError(f"{what}: checkpoint directory {source} does not exist")
    return source


def load_component(loader: Callable[[str], Any], source: str, what: str) -> Any:
    """Calls ``loader(resolved_source)`` and turns missing-checkpoint failures into one clear AudioGenError."""
    resolved = resolve_source(source, what)
    try:
        return loader(resolved)
    except (OSError, EnvironmentError, ValueError) as error:
        if os.path.isdir(resolved):
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise AudioGenError(f"{what}: could not load the checkpoint in {resolved}: {first_line}") from error
        how = ("HF_HUB_OFFLINE is set and it is not in the local hub cache" if hub_offline()
               else "the Hugging Face hub could not be reached or has no such repository")
        raise AudioGenError(
            f"{what}: could not load '{source}' ({how}); download it where there is internet "
            f"(huggingface-cli download {source} --local-dir DIR) and pass that directory instead") from error


def checkpoint_identity(resolved: str) -> dict[str, str]:
    """A location-independent identity of a checkpoint directory (or just the id for an unresolved hub id)."""
    path = pathlib.Path(resolved)
    if not path.is_dir():
        return _hub_identity(resolved)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if relative.startswith(".") or "/." in relative:
            continue
        if file.suffix in _CONFIG_SUFFIXES:
            digest.update(f"{relative}\0".encode())
            digest.update(file.read_bytes())
        elif file.suffix in _WEIGHT_SUFFIXES:
            size = file.stat().st_size
            digest.update(f"{relative}\0{size}\0".encode())
            with file.open("rb") as handle:
                digest.update(handle.read(_EDGE_BYTES))
                if size > 2 * _EDGE_BYTES:
                    handle.seek(size - _EDGE_BYTES)
                    digest.update(handle.read(_EDGE_BYTES))
    identity = {"digest": digest.hexdigest()[:16]}
    # A hub-cache snapshot lives in .../models--owner--name/snapshots/<commit>/: keep the id and revision.
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        identity["id"] = parts[-3][len("models--"):].replace("--", "/")
        identity["revision"] = parts[-1]
    return identity


def _hub_identity(repo_id: str) -> dict[str, str]:
    """For a hub id: the id plus the revision the local hub cache holds (after loading, it holds one)."""
    identity = {"id": repo_id}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return identity
    for filename in ("model_index.json", "config.json"):
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            parts = pathlib.Path(cached).parts
            if "snapshots" in parts:
                identity["revision"] = parts[parts.index("snapshots") + 1]
            break
    return identity


_DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")


def torch_device_and_dtype(device: str, dtype: str, *, what: str = "model"):
    """Resolves the config's ``device`` ("auto" | "cpu" | "cuda" | "cuda:N") and ``dtype`` ("auto" | "float32" |
    "float16" | "bfloat16"): "auto" means CUDA when available, float16 on GPU and float32 on CPU (half precision
    on CPU is slow and poorly supported)."""
    import torch

    device = (device or "auto").strip()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AudioGenError(f"{what}: device {device!r} requested but CUDA is not available (use device=cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise AudioGenError(f"{what}: device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if isinstance(dtype, torch.dtype):
        return torch.device(device), dtype
    dtype = (dtype or "auto").strip()
    if dtype not in _DTYPE_NAMES:
        raise AudioGenError(f"{what}: dtype: expected one of {', '.join(_DTYPE_NAMES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)
