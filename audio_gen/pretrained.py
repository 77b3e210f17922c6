"""Where the sidecar's pretrained components come from: a local directory, a Hugging Face hub id, or a tiny
random-init stand-in.

Every loader of the sidecar (Stable Audio, CLAP, AST) resolves its checkpoint with `resolve_source` and loads it
with `load_component`, so a real checkpoint and the offline test's tiny one take exactly the same code path
(`from_pretrained` on a directory).

- ``"tiny:<name>"`` builds (once, atomically) or reuses a tiny random-init checkpoint from `audio_gen.tiny`;
  hub ids cannot contain ``:``, so the prefix is unambiguous.
- Everything else goes through the project's one resolver, `ith_common.hub.resolve_checkpoint_dir`: an existing
  directory is used as is, a missing local-looking path or a file is an error, and a hub id becomes a snapshot
  directory (huggingface_hub decides what ``HF_HUB_OFFLINE`` means; a failure says how to use a local copy).

`checkpoint_identity` gives what goes into the cache fingerprint for a checkpoint: its hub revision when it
came from the hub cache, plus a digest of its config files and weight-file sizes/edges, so that the same
weights copied to another directory give the same cache key.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Callable, Sequence

from ith_common.errors import UserError
from ith_common.hub import resolve_checkpoint_dir

TINY_PREFIX = "tiny:"

# What a hub download fetches: configs, tokenizer and preprocessor files and safetensors weights, not the other
# weight formats a repo may also carry (pickles, TF, Flax, the original training checkpoint).
TRANSFORMERS_FILES = ("*.json", "*.txt", "*.model", "*.safetensors")
# A diffusers pipeline keeps each component in a subfolder; root-level weights (Stable Audio Open's repo also
# carries its original stable-audio-tools checkpoint, several GB) are not read by diffusers.
DIFFUSERS_PIPELINE_FILES = ("model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors")

# Files that define a checkpoint's architecture and preprocessing; hashed in full.
_CONFIG_SUFFIXES = (".json", ".txt", ".model")
# Weight files are large: only their size and first/last MiB enter the identity digest (see module doc).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
_EDGE_BYTES = 1 << 20


def resolve_source(source: str, what: str, *, hub_files: Sequence[str] = TRANSFORMERS_FILES) -> str:
    """The checkpoint directory for a config value (a local directory, a hub id or tiny:<name>).

    ``hub_files`` are the allow-patterns of a hub download; a repo without safetensors weights gets its
    ``.bin`` weights instead (the same patterns with ``.bin``)."""
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"{what}: expected a local checkpoint directory, a hub id or tiny:<name>, got {source!r}")
    source = source.strip()
    if source.startswith(TINY_PREFIX):
        from audio_gen import tiny  # imported lazily: it pulls in diffusers

        return str(tiny.ensure_tiny_checkpoint(source[len(TINY_PREFIX):]))
    directory = resolve_checkpoint_dir(source, what=what, allow_patterns=hub_files)
    if not pathlib.Path(source).expanduser().is_dir() and not any(directory.rglob("*.safetensors")):
        # A hub repo with only pickled weights (older uploads): fetch those instead.
        bin_files = [pattern.replace(".safetensors", ".bin") for pattern in hub_files
                     if pattern.endswith(".safetensors")]
        directory = resolve_checkpoint_dir(source, what=what, allow_patterns=[*hub_files, *bin_files])
    return str(directory)


def load_component(loader: Callable[[str], Any], directory: str, what: str) -> Any:
    """Calls ``loader(directory)`` (a directory from `resolve_source`) and turns a checkpoint that does not load
    into one clear UserError."""
    try:
        return loader(directory)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{what}: could not load the checkpoint in {directory}: {first_line}") from error


def checkpoint_identity(resolved: str) -> dict[str, str]:
    """A location-independent identity of a checkpoint directory."""
    path = pathlib.Path(resolved)
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
        raise UserError(f"{what}: device {device!r} requested but CUDA is not available (use device=cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"{what}: device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if isinstance(dtype, torch.dtype):
        return torch.device(device), dtype
    dtype = (dtype or "auto").strip()
    if dtype not in _DTYPE_NAMES:
        raise UserError(f"{what}: dtype: expected one of {', '.join(_DTYPE_NAMES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)
