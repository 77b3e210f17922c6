"""The audio embedding cache: a content-addressed, atomic, resumable, shardable store of audio tokens.

Format version 1, specified in `docs/cache.md`.  In short:

    CACHE_DIR/cache.json                               format name + version + fingerprint (written once)
    CACHE_DIR/shards/shard-IIIII-of-NNNNN.data         append-only records (header + aligned arrays + sha256)
    CACHE_DIR/shards/shard-IIIII-of-NNNNN.index.jsonl  append-only, one line per committed entry (with a crc)
    CACHE_DIR/shards/shard-IIIII-of-NNNNN.lock         flock()ed by the one writer of that shard
    CACHE_DIR/audio/KK/KEY.C.flac                      optional waveforms, candidate C of entry KEY

An entry is committed once its index line is complete: the record is appended to the data file and synced,
then the index line is appended and synced.  Whatever follows the last complete index line (an unfinished
record, a torn line) is ignored by readers and cut off by the next writer of that shard.

This module imports numpy and the standard library only (soundfile lazily, for waveforms), because the JAX
side reads the cache through it.  `python -m audio_gen.cache verify|stats|merge ...` is its command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import re
import struct
import sys
import tempfile
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from audio_gen.errors import AudioGenError
from audio_gen.selection import DEFAULT_THRESHOLDS, acceptance_rates

CACHE_FORMAT_VERSION = 1
FORMAT_NAME = "ith-jax-audio-cache"
CACHE_JSON = "cache.json"
SHARDS_DIR = "shards"
AUDIO_DIR = "audio"
TMP_DIR = "tmp"  # tmp/<shard>/: each writer's temporary files, emptied when that shard is next opened

RECORD_MAGIC = b"ITHACREC"
# magic, header length, crc32 of the header bytes
RECORD_PREFIX = struct.Struct("<8sII")
ALIGN = 64  # every record and every array starts at a multiple of 64 bytes (cache-line / SIMD friendly)
MAX_HEADER_BYTES = 64 * 1024 * 1024

# Stored dtypes are fixed by the format (little-endian, numpy `dtype.str` spelling).
ARRAY_DTYPES = {"tokens": "<f2", "token_mask": "|b1", "clap_scores": "<f4"}
FLAC_SUBTYPE = "PCM_24"

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})$")


class CacheError(AudioGenError):
    """A cache problem the user must act on (bad entry, other settings, corruption); one line."""


# --------------------------------------------------------------------------------------------------------
# Keys and small helpers
# --------------------------------------------------------------------------------------------------------

def canonical_json(obj: Any) -> bytes:
    """The one serialisation used for hashing and checksums: sorted keys, no spaces, ASCII, no NaN."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise CacheError(f"cannot serialise to JSON: {exc}") from None


def entry_key(prompt: str, generator: dict, seed: int, encoder: dict) -> str:
    """sha256 hex of canonical JSON of `{"encoder", "generator", "prompt", "seed"}`.

    The key addresses the content: the same prompt under the same generator settings, seed and encoder always
    maps to the same key, so reruns find their work, and no file name is ever built from the prompt.
    """
    if not isinstance(prompt, str):
        raise CacheError(f"entry_key: prompt must be a string, got {type(prompt).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CacheError(f"entry_key: seed must be an integer, got {seed!r}")
    payload = {"prompt": prompt, "generator": generator, "seed": seed, "encoder": encoder}
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def shard_name(shard_index: int, num_shards: int) -> str:
    return f"shard-{shard_index:05d}-of-{num_shards:05d}"


def shard_of_key(key: str, num_shards: int) -> int:
    """Which of `num_shards` shards owns `key`: keys are sha256 hex, so their leading bits are uniform."""
    return int(key[:16], 16) % num_shards


def _check_key(key: Any, where: str = "key") -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise CacheError(f"{where}: expected 64 lowercase hex characters (an entry_key()), got {key!r:.80}")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _jsonable(obj: Any, what: str) -> Any:
    """`obj` after a JSON round trip (tuples become lists), so that comparisons match what is stored."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CacheError(f"{what}: expected JSON-serialisable values (no NaN/inf), {exc}") from None


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix or "<root>": obj}


def fingerprint_differences(stored: dict, wanted: dict) -> list[str]:
    """Human-readable list of the dotted keys whose values differ between two fingerprints."""
    a, b = _flatten(stored), _flatten(wanted)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            sa = "(absent)" if va is missing else json.dumps(va)
            sb = "(absent)" if vb is missing else json.dumps(vb)
            diffs.append(f"{key}: cache has {sa}, this run has {sb}")
    return diffs


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_fd(fd: int) -> None:
    # fdatasync also persists the file size, which is all an append needs; fsync where it is missing.
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _atomic_write(path: pathlib.Path, data: bytes, *, sync_dir: bool = True,
                  tmp_dir: pathlib.Path | None = None) -> None:
    """temp file (in `tmp_dir`, default beside `path`), write, fsync, rename over `path`, fsync the directory."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
    try:
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp_name, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def _pread(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------------------
# Entries and records
# --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CacheEntry:
    """One prompt's K candidates.

    tokens: float16 [K, T, D]; token_mask: bool [K, T] or None when every token is valid (an all-True mask is
    stored as None); clap_scores: float32 [K]; metadata: JSON-serialisable dict (generation settings, timings);
    waveforms: optional float32 [K, S] (mono) or [K, C, S], written as FLAC (24-bit, values clipped to
    [-1, 1]) when the writer has `store_waveforms=True`; sample_rate: Hz, required with waveforms.
    """
    key: str
    prompt: str
    tokens: np.ndarray
    token_mask: np.ndarray | None
    clap_scores: np.ndarray
    metadata: dict = dataclasses.field(default_factory=dict)
    waveforms: np.ndarray | None = None
    sample_rate: int | None = None

    @property
    def num_candidates(self) -> int:
        return int(self.tokens.shape[0])


def _validated_arrays(entry: CacheEntry) -> tuple[dict[str, np.ndarray], dict]:
    """Check an entry and return its arrays in their stored dtypes plus its JSON-normalised metadata."""
    if not isinstance(entry, CacheEntry):
        raise CacheError(f"add: expected a CacheEntry, got {type(entry).__name__}")
    _check_key(entry.key, "entry.key")
    where = f"entry {entry.key[:12]}"
    if not isinstance(entry.prompt, str):
        raise CacheError(f"{where}: field 'prompt': expected a string, got {type(entry.prompt).__name__}")

    tokens = np.asarray(entry.tokens)
    if tokens.ndim != 3 or min(tokens.shape) < 1 or not np.issubdtype(tokens.dtype, np.floating):
        raise CacheError(f"{where}: field 'tokens': expected a float array [K, T, D] with K, T, D >= 1, "
                         f"got {tokens.dtype} {tokens.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        tokens16 = tokens.astype("<f2")
    if not np.isfinite(tokens16).all():
        raise CacheError(f"{where}: field 'tokens': non-finite values after casting to float16 "
                         f"(float16 overflows above 65504; got max |x| = {np.nanmax(np.abs(tokens)):.4g})")
    num_candidates, num_tokens, _ = tokens16.shape

    arrays = {"tokens": tokens16}
    if entry.token_mask is not None:
        mask = np.asarray(entry.token_mask)
        if mask.shape != (num_candidates, num_tokens):
            raise CacheError(f"{where}: field 'token_mask': expected shape {(num_candidates, num_tokens)} "
                             f"[K, T] like tokens, got {mask.shape}")
        if mask.dtype != np.bool_:
            if not np.issubdtype(mask.dtype, np.integer) or not np.isin(mask, (0, 1)).all():
                raise CacheError(f"{where}: field 'token_mask': expected booleans, got {mask.dtype}")
            mask = mask.astype(bool)
        if not mask.any(axis=1).all():
            empty = int(np.flatnonzero(~mask.any(axis=1))[0])
            raise CacheError(f"{where}: field 'token_mask': candidate {empty} has no valid token "
                             "(attention over it would be undefined)")
        if not mask.all():
            arrays["token_mask"] = mask.astype("|b1")

    scores = np.asarray(entry.clap_scores)
    if scores.shape != (num_candidates,) or not (np.issubdtype(scores.dtype, np.floating)
                                                 or np.issubdtype(scores.dtype, np.integer)):
        raise CacheError(f"{where}: field 'clap_scores': expected {num_candidates} numbers [K], "
                         f"got {scores.dtype} {scores.shape}")
    scores32 = scores.astype("<f4")
    if not np.isfinite(scores32).all():
        raise CacheError(f"{where}: field 'clap_scores': expected finite values, got {scores.tolist()}")
    arrays["clap_scores"] = scores32

    if not isinstance(entry.metadata, dict):
        raise CacheError(f"{where}: field 'metadata': expected a dict, got {type(entry.metadata).__name__}")
    metadata = _jsonable(entry.metadata, f"{where}: field 'metadata'")
    return arrays, metadata


def _validated_waveforms(entry: CacheEntry, num_candidates: int) -> np.ndarray:
    where = f"entry {entry.key[:12]}"
    waves = np.asarray(entry.waveforms)
    if waves.ndim not in (2, 3) or waves.shape[0] != num_candidates or waves.shape[-1] < 1 \
            or not np.issubdtype(waves.dtype, np.floating):
        raise CacheError(f"{where}: field 'waveforms': expected a float array [K, S] or [K, C, S] with "
                         f"K = {num_candidates}, got {waves.dtype} {waves.shape}")
    if waves.ndim == 3 and not 1 <= waves.shape[1] <= 8:
        raise CacheError(f"{where}: field 'waveforms': FLAC holds 1 to 8 channels, got {waves.shape[1]}")
    if not np.isfinite(waves).all():
        raise CacheError(f"{where}: field 'waveforms': expected finite samples")
    rate = entry.sample_rate
    if not isinstance(rate, int) or isinstance(rate, bool) or not 1 <= rate <= 655_350:
        raise CacheError(f"{where}: field 'sample_rate': expected an integer sample rate in Hz "
                         f"(1..655350) with waveforms, got {rate!r}")
    return waves.astype(np.float32)


def _soundfile():
    try:
        import soundfile  # optional: only needed when waveforms are written or read
    except ImportError:
        raise CacheError("waveforms are stored as FLAC, which needs the soundfile package "
                         "(pip install soundfile, or ith-jax[audio])") from None
    return soundfile


def _encode_flac(waveform: np.ndarray, sample_rate: int) -> bytes:
    soundfile = _soundfile()

    frames = waveform if waveform.ndim == 1 else waveform.T  # soundfile wants (frames, channels)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(frames, -1.0, 1.0), sample_rate, format="FLAC", subtype=FLAC_SUBTYPE)
    return buffer.getvalue()


def _decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    soundfile = _soundfile()

    frames, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return frames.T, int(rate)  # (channels, frames)


def waveform_relpath(key: str, candidate: int) -> str:
    """Where candidate `candidate` of entry `key` is stored, relative to the cache directory."""
    return f"{AUDIO_DIR}/{key[:2]}/{key}.{candidate}.flac"


def _build_record(key: str, prompt: str, arrays: dict[str, np.ndarray], metadata: dict,
                  waveform_files: list[dict] | None, sample_rate: int | None) -> bytes:
    """Serialise one entry: prefix, JSON header, zero padding, then each array at a 64-byte boundary."""
    payload = bytearray()
    specs = {}
    for name in ("tokens", "token_mask", "clap_scores"):
        if name not in arrays:
            continue
        array = np.ascontiguousarray(arrays[name])
        payload.extend(b"\0" * (_align(len(payload)) - len(payload)))
        specs[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": len(payload),
                       "nbytes": array.nbytes}
        payload.extend(array.tobytes())
    payload.extend(b"\0" * (_align(len(payload)) - len(payload)))
    header = {
        "format_version": CACHE_FORMAT_VERSION,
        "key": key,
        "prompt": prompt,
        "arrays": specs,
        "metadata": metadata,
        "waveforms": waveform_files,
        "sample_rate": sample_rate,
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    header_bytes = canonical_json(header)
    prefix = RECORD_PREFIX.pack(RECORD_MAGIC, len(header_bytes), zlib.crc32(header_bytes))
    head = prefix + header_bytes
    head += b"\0" * (_align(len(head)) - len(head))
    return head + bytes(payload)


def _parse_record(record: bytes | bytearray, expected_key: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Check one record's structure and checksums; return its header and arrays (views into `record`)."""
    if len(record) < RECORD_PREFIX.size:
        raise CacheError(f"record is {len(record)} bytes, shorter than its {RECORD_PREFIX.size}-byte prefix")
    magic, header_len, header_crc = RECORD_PREFIX.unpack_from(record, 0)
    if magic != RECORD_MAGIC:
        raise CacheError(f"bad record magic {magic!r} (expected {RECORD_MAGIC!r})")
    header_end = RECORD_PREFIX.size + header_len
    if header_len > MAX_HEADER_BYTES or header_end > len(record):
        raise CacheError(f"record header length {header_len} runs past the record ({len(record)} bytes)")
    header_bytes = bytes(record[RECORD_PREFIX.size:header_end])
    if zlib.crc32(header_bytes) != header_crc:
        raise CacheError("record header crc32 mismatch")
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise CacheError(f"record header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheError(f"record format_version {header.get('format_version') if isinstance(header, dict) else None!r}"
                         f" is not {CACHE_FORMAT_VERSION}")
    if expected_key is not None and header.get("key") != expected_key:
        raise CacheError(f"record holds key {str(header.get('key'))[:16]}..., the index says {expected_key[:16]}...")
    payload_start = _align(header_end)
    payload = memoryview(record)[payload_start:]
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise CacheError("record payload sha256 mismatch")
    arrays = {}
    for name, spec in header.get("arrays", {}).items():
        if name not in ARRAY_DTYPES or spec.get("dtype") != ARRAY_DTYPES[name]:
            raise CacheError(f"array {name!r}: unexpected name or dtype {spec.get('dtype')!r}")
        shape = tuple(spec["shape"])
        count = int(np.prod(shape)) if shape else 1
        dtype = np.dtype(spec["dtype"])
        if spec["offset"] % ALIGN or spec["nbytes"] != count * dtype.itemsize \
                or spec["offset"] + spec["nbytes"] > len(payload):
            raise CacheError(f"array {name!r}: offset/size {spec['offset']}/{spec['nbytes']} do not fit "
                             f"shape {list(shape)} in a {len(payload)}-byte payload")
        arrays[name] = np.frombuffer(record, dtype=dtype, count=count,
                                     offset=payload_start + spec["offset"]).reshape(shape)
    tokens = arrays.get("tokens")
    if tokens is None or tokens.ndim != 3:
        raise CacheError("record has no 3-D 'tokens' array")
    num_candidates, num_tokens, _ = tokens.shape
    if "clap_scores" not in arrays or arrays["clap_scores"].shape != (num_candidates,):
        raise CacheError(f"record 'clap_scores' missing or not of shape [{num_candidates}]")
    if "token_mask" in arrays and arrays["token_mask"].shape != (num_candidates, num_tokens):
        raise CacheError(f"record 'token_mask' is not of shape [{num_candidates}, {num_tokens}]")
    waves = header.get("waveforms")
    if waves is not None and (not isinstance(waves, list) or len(waves) != num_candidates):
        raise CacheError(f"record 'waveforms' should list {num_candidates} files")
    return header, arrays


# --------------------------------------------------------------------------------------------------------
# Index files
# --------------------------------------------------------------------------------------------------------

_CRC_MARK = b',"crc":"'


def _index_line(key: str, prompt: str, offset: int, length: int, record_sha256: str,
                clap_scores: np.ndarray) -> bytes:
    """Canonical JSON of the fields, with `"crc"` (crc32 of that canonical JSON) appended as the last key.

    Keeping crc last lets readers check a line on its raw bytes (everything before `,"crc":"`, plus `}`)
    without serialising it again; `,"crc":"` cannot occur earlier because quotes inside strings are escaped.
    """
    # float(np.float32) prints the shortest repr that round-trips back to the same float32.
    body = canonical_json({"key": key, "prompt": prompt, "offset": offset, "length": length,
                           "sha256": record_sha256,
                           "clap_scores": [float(s) for s in np.asarray(clap_scores, dtype=np.float32)]})
    return body[:-1] + _CRC_MARK + f"{zlib.crc32(body):08x}".encode() + b'"}\n'


@dataclasses.dataclass
class _IndexRow:
    key: str
    prompt: str
    offset: int
    length: int
    sha256: str
    clap_scores: list
    shard: str
    line: int


@dataclasses.dataclass
class _IndexScan:
    rows: list[_IndexRow]
    committed_bytes: int   # length of the index file up to the last good line
    torn_tail: bytes       # what follows it (an unfinished or damaged last line), b"" when clean
    problems: list[str]    # damaged lines before the last one: corruption


def _parse_index_line(raw: bytes, shard: str, line: int) -> _IndexRow:
    mark = raw.rfind(_CRC_MARK)
    if mark < 0 or not raw.endswith(b'"}') or len(raw) - mark != len(_CRC_MARK) + 10:
        raise CacheError("not an index line ending in a crc")
    if f"{zlib.crc32(raw[:mark] + b'}'):08x}".encode() != raw[mark + len(_CRC_MARK):-2]:
        raise CacheError("crc mismatch")
    try:
        obj = json.loads(raw)
        row = _IndexRow(obj["key"], obj["prompt"], obj["offset"], obj["length"], obj["sha256"],
                        obj["clap_scores"], shard, line)
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"invalid index entry ({exc})") from None
    _check_key(row.key)
    return row


def _scan_index(path: pathlib.Path, shard: str) -> _IndexScan:
    """Read an index file; the last line may be unfinished (a writer in flight or killed): it is not an error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _IndexScan([], 0, b"", [])
    rows: list[_IndexRow] = []
    problems: list[str] = []
    position = 0
    committed = 0
    line_number = 0
    torn = b""
    while position < len(data):
        newline = data.find(b"\n", position)
        line_number += 1
        if newline < 0:
            torn = data[position:]  # no newline: an append that never finished
            break
        raw = data[position:newline]
        try:
            rows.append(_parse_index_line(raw, shard, line_number))
            committed = newline + 1
        except CacheError as exc:
            if newline + 1 == len(data):
                torn = data[position:]  # a damaged last line is an append cut short, not lost data
            else:
                problems.append(f"{path.name}: line {line_number}: {exc}")
                committed = newline + 1
        position = newline + 1
    return _IndexScan(rows, committed, torn, problems)


def _shard_files(cache_dir: pathlib.Path) -> list[str]:
    """Names of the shards present (from their data or index files), sorted."""
    directory = cache_dir / SHARDS_DIR
    if not directory.is_dir():
        return []
    names = set()
    for path in directory.iterdir():
        for suffix in (".index.jsonl", ".data"):
            if path.name.endswith(suffix) and _SHARD_RE.match(path.name[: -len(suffix)]):
                names.add(path.name[: -len(suffix)])
    return sorted(names)


def _read_cache_json(cache_dir: pathlib.Path) -> dict:
    path = cache_dir / CACHE_JSON
    try:
        info = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CacheError(f"{cache_dir}: not an audio cache (no {CACHE_JSON})") from None
    except ValueError as exc:
        raise CacheError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise CacheError(f"{path}: field 'format': expected {FORMAT_NAME!r}")
    version = info.get("format_version")
    if version != CACHE_FORMAT_VERSION:
        raise CacheError(f"{path}: field 'format_version': this reader understands version "
                         f"{CACHE_FORMAT_VERSION}, the cache has {version!r}")
    if not isinstance(info.get("fingerprint"), dict):
        raise CacheError(f"{path}: field 'fingerprint': expected an object")
    return info


# --------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------

class CacheWriter:
    """Appends entries to one shard of a cache directory; see the module docstring and `docs/cache.md`.

    Entries are committed in groups of `commit_every` (default 1: each `add` is durable when it returns): the
    group's records are appended, the data file synced, then the group's index lines appended and synced.
    `flush()` and `close()` commit a partial group.  A writer killed before a commit loses only the
    uncommitted group.  `has()` is True for uncommitted entries of this writer too.

    A writer owns the keys with `shard_of_key(key, num_shards) == shard_index` and refuses others, so N
    writers with distinct shard indices never write the same entry.  One process at a time may hold a shard
    (an flock on its .lock file).
    """

    def __init__(self, cache_dir: str | os.PathLike, *, fingerprint: dict, num_shards: int = 1,
                 shard_index: int = 0, store_waveforms: bool = False, commit_every: int = 1):
        if not isinstance(num_shards, int) or not 1 <= num_shards <= 99_999:
            raise CacheError(f"num_shards: expected an integer in 1..99999, got {num_shards!r}")
        if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
            raise CacheError(f"shard_index: expected an integer in 0..{num_shards - 1}, got {shard_index!r}")
        if not isinstance(fingerprint, dict):
            raise CacheError(f"fingerprint: expected a dict, got {type(fingerprint).__name__}")
        if not isinstance(commit_every, int) or commit_every < 1:
            raise CacheError(f"commit_every: expected an integer >= 1, got {commit_every!r}")
        self.commit_every = commit_every
        self._pending: list[tuple[str, bytes]] = []  # (key, index line) written but not committed
        self._dirs_to_sync: set[pathlib.Path] = set()
        self.cache_dir = pathlib.Path(cache_dir)
        self.fingerprint = _jsonable(fingerprint, "fingerprint")
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.store_waveforms = store_waveforms
        self.shard = shard_name(shard_index, num_shards)
        self.added = 0
        self._lock_fd = self._data_fd = self._index_fd = -1
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------------------------
    def _open(self) -> None:
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise CacheError(f"{self.cache_dir}: exists and is not a directory")
        created_root = not self.cache_dir.exists()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        shards_dir = self.cache_dir / SHARDS_DIR
        new_dirs = [d for d in (shards_dir, self.cache_dir / AUDIO_DIR) if not d.exists()]
        for d in new_dirs:
            d.mkdir(exist_ok=True)
        if created_root:
            _fsync_dir(self.cache_dir.parent)
        self._ensure_cache_json()
        if new_dirs:
            _fsync_dir(self.cache_dir)

        lock_path = shards_dir / f"{self.shard}.lock"
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        import fcntl  # POSIX only; imported here so that readers work everywhere
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"{lock_path}: shard {self.shard} is being written by another process "
                             "(each shard index may run once at a time)") from None

        index_path = shards_dir / f"{self.shard}.index.jsonl"
        data_path = shards_dir / f"{self.shard}.data"
        created = not index_path.exists() or not data_path.exists()
        self._index_fd = os.open(index_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._data_fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o644)
        scan = _scan_index(index_path, self.shard)
        if scan.problems:
            raise CacheError(f"{index_path}: damaged index ({scan.problems[0]}); run "
                             f"`python -m audio_gen.cache verify {self.cache_dir}`")
        # Cut off what a killed predecessor left unfinished: a torn index line, then an uncommitted record.
        if scan.torn_tail:
            os.ftruncate(self._index_fd, scan.committed_bytes)
            _sync_fd(self._index_fd)
        committed_end = max((row.offset + row.length for row in scan.rows), default=0)
        data_size = os.fstat(self._data_fd).st_size
        if data_size < committed_end:
            raise CacheError(f"{data_path}: data file is {data_size} bytes but its index references "
                             f"{committed_end}; the shard is damaged, run "
                             f"`python -m audio_gen.cache verify {self.cache_dir}`")
        if data_size > committed_end:
            os.ftruncate(self._data_fd, committed_end)
            _sync_fd(self._data_fd)
        self._data_end = committed_end      # end of the committed records
        self._written_end = committed_end   # end of the records written so far (committed or pending)
        self._index_end = scan.committed_bytes
        # Temporary files of a killed predecessor on this shard (we hold its lock, so none is in use).
        self._tmp_dir = self.cache_dir / TMP_DIR / self.shard
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._tmp_dir.iterdir():
            stale.unlink()
        if created:
            _fsync_dir(shards_dir)

        # Keys finished anywhere in the cache (all shards, any shard count) so that reruns skip them.
        self._finished: set[str] = {row.key for row in scan.rows}
        for other in _shard_files(self.cache_dir):
            if other != self.shard:
                other_scan = _scan_index(shards_dir / f"{other}.index.jsonl", other)
                self._finished.update(row.key for row in other_scan.rows)

    def _ensure_cache_json(self) -> None:
        path = self.cache_dir / CACHE_JSON
        if not path.exists():
            info = {"format": FORMAT_NAME, "format_version": CACHE_FORMAT_VERSION,
                    "fingerprint": self.fingerprint}
            data = json.dumps(info, indent=2, sort_keys=True).encode("utf-8") + b"\n"
            fd, tmp_name = tempfile.mkstemp(prefix=".cache.json.", suffix=".tmp", dir=self.cache_dir)
            try:
                _write_all(fd, data)
                os.fsync(fd)
                os.close(fd)
                fd = -1
                # link() fails if cache.json exists: of N writers starting together exactly one creates it,
                # and the others compare against it below.
                try:
                    os.link(tmp_name, path)
                except FileExistsError:
                    pass
            finally:
                if fd >= 0:
                    os.close(fd)
                os.unlink(tmp_name)
            _fsync_dir(self.cache_dir)
        stored = _read_cache_json(self.cache_dir)["fingerprint"]
        if stored != self.fingerprint:
            diffs = fingerprint_differences(stored, self.fingerprint)
            raise CacheError(f"{path}: the cache was built with other settings; differing fingerprint keys: "
                             f"{'; '.join(diffs)} (use another cache_dir, or the settings of the cache)")

    # -- API ----------------------------------------------------------------------------------------------
    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def owns(self, key: str) -> bool:
        """Whether this writer's shard is the one that stores `key`."""
        return self.num_shards == 1 or shard_of_key(key, self.num_shards) == self.shard_index

    def has(self, key: str) -> bool:
        """Whether `key` is finished anywhere in the cache (as of opening, plus this writer's additions)."""
        return key in self._finished

    def add(self, entry: CacheEntry) -> None:
        """Validate and append `entry`; committed (durable) at once with commit_every=1, else at the next
        commit (a full group, `flush()` or `close()`)."""
        self._check_open()
        arrays, metadata = _validated_arrays(entry)
        if not self.owns(entry.key):
            raise CacheError(f"entry {entry.key[:12]}: belongs to shard {shard_of_key(entry.key, self.num_shards)}"
                             f" of {self.num_shards}, this writer is shard {self.shard_index}; "
                             "skip keys for which writer.owns(key) is False")
        if self.has(entry.key):
            raise CacheError(f"entry {entry.key[:12]}: already in the cache (check writer.has(key) first)")
        waveform_files = None
        sample_rate = None
        if self.store_waveforms and entry.waveforms is not None:
            waves = _validated_waveforms(entry, arrays["tokens"].shape[0])
            sample_rate = entry.sample_rate
            waveform_files = self._write_waveforms(entry.key, waves, sample_rate)
        record = _build_record(entry.key, entry.prompt, arrays, metadata, waveform_files, sample_rate)
        self._append(entry.key, entry.prompt, record, arrays["clap_scores"])

    @property
    def pending(self) -> int:
        """Entries written but not yet committed."""
        return len(self._pending)

    def flush(self) -> None:
        """Commit every pending entry (durable when this returns)."""
        self._check_open()
        self._commit()

    def close(self) -> None:
        """Commit pending entries, then release the shard."""
        try:
            if self._pending and self._data_fd >= 0:
                self._commit()
        finally:
            for name in ("_data_fd", "_index_fd", "_lock_fd"):  # the lock goes last
                fd = getattr(self, name, -1)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, name, -1)

    # -- internals ----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._data_fd < 0:
            raise CacheError(f"{self.cache_dir}: writer is closed")

    def _write_waveforms(self, key: str, waves: np.ndarray, sample_rate: int) -> list[dict]:
        files = []
        for candidate, wave in enumerate(waves):
            data = _encode_flac(wave, sample_rate)
            relpath = waveform_relpath(key, candidate)
            files.append(self._write_audio_file(relpath, data)
                         | {"frames": int(wave.shape[-1]), "channels": 1 if wave.ndim == 1 else int(wave.shape[0])})
        return files

    def _write_audio_file(self, relpath: str, data: bytes) -> dict:
        """Atomically place one audio file; its directory is synced at the next commit, before the index."""
        path = self.cache_dir / relpath
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs_to_sync.add(path.parent.parent)
        _atomic_write(path, data, sync_dir=False, tmp_dir=self._tmp_dir)
        self._dirs_to_sync.add(path.parent)
        return {"path": relpath, "sha256": hashlib.sha256(data).hexdigest()}

    def _append(self, key: str, prompt: str, record: bytes, clap_scores: np.ndarray) -> None:
        """Write the record after the last one and queue its index line; commit when the group is full."""
        line = _index_line(key, prompt, self._written_end, len(record), hashlib.sha256(record).hexdigest(),
                           clap_scores)
        try:
            os.lseek(self._data_fd, self._written_end, os.SEEK_SET)
            _write_all(self._data_fd, record)
        except BaseException:
            # e.g. disk full: drop the partial record so the next add starts from a clean end.
            try:
                os.ftruncate(self._data_fd, self._written_end)
            except OSError:
                pass
            raise
        self._written_end += len(record)
        self._pending.append((key, line))
        self._finished.add(key)
        if len(self._pending) >= self.commit_every:
            self._commit()

    def _commit(self) -> None:
        """Commit protocol: sync audio dirs and data file, then append the index lines and sync the index."""
        if not self._pending:
            return
        lines = b"".join(line for _, line in self._pending)
        try:
            for directory in sorted(self._dirs_to_sync, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(directory)
            _sync_fd(self._data_fd)
            os.lseek(self._index_fd, self._index_end, os.SEEK_SET)
            _write_all(self._index_fd, lines)
            _sync_fd(self._index_fd)
        except BaseException:
            # Undo the whole group so the files stay consistent; its entries are not in the cache.
            try:
                os.ftruncate(self._index_fd, self._index_end)
                os.ftruncate(self._data_fd, self._data_end)
            except OSError:
                pass
            for key, _ in self._pending:
                self._finished.discard(key)
            self._pending.clear()
            self._written_end = self._data_end
            raise
        self._dirs_to_sync.clear()
        self.added += len(self._pending)
        self._pending.clear()
        self._data_end = self._written_end
        self._index_end += len(lines)

    def _append_copied(self, source: "CacheReader", key: str) -> None:
        """Copy one entry byte for byte from another cache (used by merge)."""
        self._check_open()
        if not self.owns(key):
            raise CacheError(f"entry {key[:12]}: not owned by shard {self.shard}")
        record = source.read_record(key)
        header, arrays = _parse_record(record, key)
        for item in header.get("waveforms") or []:
            data = (source.cache_dir / item["path"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != item["sha256"]:
                raise CacheError(f"{source.cache_dir / item['path']}: sha256 mismatch, not copying entry {key[:12]}")
            self._write_audio_file(item["path"], data)
        self._append(key, header["prompt"], bytes(record), arrays["clap_scores"])


# --------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------

class CacheReader:
    """numpy-only view of every shard of a cache directory as one cache (a snapshot taken when opened)."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = pathlib.Path(cache_dir)
        if not self.cache_dir.is_dir():
            raise CacheError(f"{self.cache_dir}: no such cache directory")
        info = _read_cache_json(self.cache_dir)
        self.fingerprint: dict = info["fingerprint"]
        self.shards = _shard_files(self.cache_dir)
        self._rows: dict[str, _IndexRow] = {}
        self.duplicates: list[tuple[_IndexRow, _IndexRow]] = []  # (first, later) rows with one key
        self._by_prompt: dict[str, list[str]] = {}
        self._scans: dict[str, _IndexScan] = {}
        for shard in self.shards:
            scan = _scan_index(self.cache_dir / SHARDS_DIR / f"{shard}.index.jsonl", shard)
            self._scans[shard] = scan
            for row in scan.rows:
                if row.key in self._rows:
                    self.duplicates.append((self._rows[row.key], row))
                    continue
                self._rows[row.key] = row
                self._by_prompt.setdefault(row.prompt, []).append(row.key)
        self._fds: dict[str, int] = {}

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def keys(self) -> list[str]:
        """Every key, shards in name order, entries in the order they were committed."""
        return list(self._rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def prompt(self, key: str) -> str:
        return self._row(key).prompt

    def clap_scores(self, key: str) -> np.ndarray:
        """The K scores of `key`, from the index (no data file read)."""
        return np.asarray(self._row(key).clap_scores, dtype=np.float32)

    def _row(self, key: str) -> _IndexRow:
        try:
            return self._rows[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the cache {self.cache_dir}") from None

    def _data_fd(self, shard: str) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self.cache_dir / SHARDS_DIR / f"{shard}.data", os.O_RDONLY)
        return self._fds[shard]

    def read_record(self, key: str) -> bytearray:
        """The raw record bytes of `key`, checked against the sha256 in the index."""
        row = self._row(key)
        try:
            return self._read_checked(row)
        except CacheError as exc:
            raise CacheError(f"{self.cache_dir / SHARDS_DIR / row.shard}.data: entry {key[:12]} "
                             f"(index line {row.line}): {exc}") from None

    def _read_checked(self, row: _IndexRow) -> bytearray:
        try:
            record = bytearray(_pread(self._data_fd(row.shard), row.length, row.offset))
        except FileNotFoundError:
            raise CacheError("data file missing") from None
        if len(record) != row.length:
            raise CacheError(f"data file truncated (the record needs bytes {row.offset}.."
                             f"{row.offset + row.length}, the file has {row.offset + len(record)})")
        if hashlib.sha256(record).hexdigest() != row.sha256:
            raise CacheError("sha256 mismatch, the record is corrupted")
        return record

    def get(self, key: str, *, waveforms: bool = False) -> CacheEntry:
        """The entry of `key` (arrays are fresh, writable numpy arrays).

        With `waveforms=True` the FLAC files are decoded too (needs soundfile); otherwise `waveforms` is None
        and `sample_rate` is whatever was stored.
        """
        record = self.read_record(key)
        row = self._row(key)
        try:
            header, arrays = _parse_record(record, key)
        except CacheError as exc:
            raise CacheError(f"{self.cache_dir / SHARDS_DIR / row.shard}.data: entry {key[:12]}: {exc}") from None
        waves = None
        if waveforms and header.get("waveforms"):
            decoded = []
            for item in header["waveforms"]:
                path = self.cache_dir / item["path"]
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != item["sha256"]:
                    raise CacheError(f"{path}: sha256 mismatch, the audio file is corrupted")
                samples, _ = _decode_flac(data)
                decoded.append(samples[0] if item["channels"] == 1 else samples)
            waves = np.stack(decoded)
        return CacheEntry(
            key=key,
            prompt=header["prompt"],
            tokens=arrays["tokens"],
            token_mask=arrays.get("token_mask"),
            clap_scores=arrays["clap_scores"],
            metadata=header["metadata"],
            waveforms=waves,
            sample_rate=header.get("sample_rate"),
        )

    def by_prompt(self, prompt: str) -> CacheEntry | None:
        """The entry whose prompt is `prompt`, None if there is none; an error if several (use `get`)."""
        keys = self._by_prompt.get(prompt, [])
        if not keys:
            return None
        if len(keys) > 1:
            raise CacheError(f"{self.cache_dir}: {len(keys)} entries have the prompt {prompt[:60]!r} "
                             "(different seeds?); look them up by key with get()")
        return self.get(keys[0])

    def keys_for_prompt(self, prompt: str) -> list[str]:
        return list(self._by_prompt.get(prompt, []))


# --------------------------------------------------------------------------------------------------------
# verify, stats, merge
# --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class VerifyReport:
    entries: int = 0
    shards: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)  # anything wrong: exit status 1
    notes: list[str] = dataclasses.field(default_factory=list)     # harmless leftovers of killed writers

    @property
    def ok(self) -> bool:
        return not self.problems


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm  # optional; only the command line shows progress
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="entry", file=sys.stderr, leave=False)


def verify(cache_dir: str | os.PathLike, *, progress: bool = False) -> VerifyReport:
    """Check every entry of a cache: checksums, shapes, dtypes, index consistency, duplicates, audio files."""
    cache_dir = pathlib.Path(cache_dir)
    report = VerifyReport()
    reader = CacheReader(cache_dir)  # raises on a missing/invalid cache.json: nothing else to check then
    report.shards = len(reader.shards)
    shards_dir = cache_dir / SHARDS_DIR
    committed_end: dict[str, int] = {}
    for shard in reader.shards:
        scan = reader._scans[shard]
        data_path = shards_dir / f"{shard}.data"
        report.problems.extend(f"shard {shard}: {p} (damaged index line)" for p in scan.problems)
        if scan.torn_tail:
            report.notes.append(f"shard {shard}: index ends with an unfinished line ({len(scan.torn_tail)} "
                                "bytes) from an interrupted writer; it is not an entry")
        match = _SHARD_RE.match(shard)
        index, count = int(match.group(1)), int(match.group(2))
        if index >= count:
            report.problems.append(f"shard {shard}: shard index {index} is not below the shard count {count}")
        for row in scan.rows:
            if count and index < count and shard_of_key(row.key, count) != index:
                report.problems.append(f"shard {shard}: entry {row.key[:12]} (index line {row.line}) belongs to "
                                       f"shard {shard_of_key(row.key, count)} of {count}")
        committed_end[shard] = max((r.offset + r.length for r in scan.rows), default=0)
        if not data_path.exists():
            if scan.rows:
                report.problems.append(f"shard {shard}: data file {data_path.name} missing "
                                       f"({len(scan.rows)} indexed entries)")
            continue
        size = data_path.stat().st_size
        if size > committed_end[shard]:
            report.notes.append(f"shard {shard}: {size - committed_end[shard]} bytes after the last committed "
                                "entry (an unfinished record of an interrupted writer; the next writer of this "
                                "shard removes them)")
        # Records must tile the data file in index order, without overlaps.
        expected_offset = 0
        for row in scan.rows:
            if row.offset != expected_offset:
                report.problems.append(f"shard {shard}: entry {row.key[:12]} (index line {row.line}) starts at "
                                       f"byte {row.offset}, expected {expected_offset}")
            expected_offset = row.offset + row.length

    leftovers = sorted(cache_dir.glob(f"{TMP_DIR}/*/*")) + sorted(cache_dir.glob(".cache.json.*.tmp"))
    if leftovers:
        report.notes.append(f"{len(leftovers)} temporary file(s) of interrupted writers (e.g. "
                            f"{leftovers[0].relative_to(cache_dir)}); the next writer of their shard removes "
                            "them, and they are never read")

    for first, later in reader.duplicates:
        report.problems.append(f"shard {later.shard}: entry {later.key[:12]} (index line {later.line}) is a "
                               f"duplicate of shard {first.shard} index line {first.line}")

    rows = list(reader._rows.values())
    for row in _progress(rows, len(rows), "verify", progress):
        where = f"shard {row.shard}: entry {row.key[:12]} (index line {row.line})"
        try:
            record = reader._read_checked(row)
            header, arrays = _parse_record(record, row.key)
        except CacheError as exc:
            report.problems.append(f"{where}: {exc}")
            continue
        except OSError as exc:
            report.problems.append(f"{where}: cannot read ({exc.strerror or exc})")
            continue
        if header["prompt"] != row.prompt:
            report.problems.append(f"{where}: prompt in the index differs from the record's")
        if not np.array_equal(np.asarray(row.clap_scores, dtype=np.float32), arrays["clap_scores"]):
            report.problems.append(f"{where}: clap_scores in the index differ from the record's")
        if not np.isfinite(arrays["clap_scores"]).all() or not np.isfinite(arrays["tokens"]).all():
            report.problems.append(f"{where}: non-finite tokens or scores")
        if "token_mask" in arrays and not arrays["token_mask"].any(axis=1).all():
            report.problems.append(f"{where}: a candidate has no valid token")
        for item in header.get("waveforms") or []:
            path = cache_dir / item["path"]
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                report.problems.append(f"{where}: audio file {item['path']} missing")
                continue
            if digest != item["sha256"]:
                report.problems.append(f"{where}: audio file {item['path']} sha256 mismatch")
        report.entries += 1
    reader.close()
    return report


def cache_stats(cache_dir: str | os.PathLike, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                bins: int = 20) -> dict:
    """Counts, sizes, acceptance rates per threshold and a histogram of every CLAP score (index only)."""
    cache_dir = pathlib.Path(cache_dir)
    with CacheReader(cache_dir) as reader:
        scores = [reader.clap_scores(key) for key in reader]
        per_shard = {s: len(reader._scans[s].rows) for s in reader.shards}
        fingerprint = reader.fingerprint

    def total_size(directory: pathlib.Path, pattern: str) -> int:
        return sum(p.stat().st_size for p in directory.glob(pattern) if p.is_file()) if directory.is_dir() else 0

    sizes = {
        "data_bytes": total_size(cache_dir / SHARDS_DIR, "*.data"),
        "index_bytes": total_size(cache_dir / SHARDS_DIR, "*.index.jsonl"),
        "audio_bytes": total_size(cache_dir / AUDIO_DIR, "*/*.flac"),
    }
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    counts, edges = np.histogram(all_scores, bins=bins, range=(-1.0, 1.0))
    first = np.asarray([s[0] for s in scores], dtype=np.float64)
    best = np.asarray([s.max() for s in scores], dtype=np.float64)

    def summary(values: np.ndarray) -> dict:
        if not values.size:
            return {"count": 0}
        return {"count": int(values.size), "min": float(values.min()), "mean": float(values.mean()),
                "median": float(np.median(values)), "max": float(values.max())}

    candidates = [len(s) for s in scores]
    return {
        "cache_dir": str(cache_dir),
        "format_version": CACHE_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "entries": len(scores),
        "shards": per_shard,
        "candidates": int(sum(candidates)),
        "candidates_per_entry": {str(k): candidates.count(k) for k in sorted(set(candidates))},
        "sizes": sizes | {"bytes_per_entry": (sizes["data_bytes"] / len(scores)) if scores else 0.0},
        "acceptance_rates": {str(t): r for t, r in acceptance_rates(scores, thresholds).items()},
        "scores_all": summary(all_scores.astype(np.float64)),
        "scores_first_candidate": summary(first),
        "scores_best_candidate": summary(best),
        "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]},
    }


def merge(out_dir: str | os.PathLike, sources: Sequence[str | os.PathLike], *, progress: bool = False) -> dict:
    """Copy every entry of `sources` into `out_dir` (created if needed) without duplicates.

    All sources and an existing `out_dir` must share one fingerprint.  Entries are copied byte for byte into
    shard 0 of 1 of `out_dir`; keys already there are skipped, so a merge can be rerun after an interruption.
    """
    out_dir = pathlib.Path(out_dir)
    if not sources:
        raise CacheError("merge: give at least one source cache")
    readers = []
    try:
        for source in sources:
            source = pathlib.Path(source)
            if source.resolve() == out_dir.resolve():
                raise CacheError(f"merge: source {source} is the output directory")
            readers.append(CacheReader(source))
        base = readers[0]
        for reader in readers[1:]:
            if reader.fingerprint != base.fingerprint:
                diffs = fingerprint_differences(base.fingerprint, reader.fingerprint)
                raise CacheError(f"merge: {reader.cache_dir} has another fingerprint than {base.cache_dir}; "
                                 f"differing keys: {'; '.join(diffs).replace('this run has', 'it has')}")
        copied = skipped = 0
        total = sum(len(r) for r in readers)
        with CacheWriter(out_dir, fingerprint=base.fingerprint, store_waveforms=True, commit_every=64) as writer:
            pairs = ((reader, key) for reader in readers for key in reader.keys())
            for reader, key in _progress(pairs, total, "merge", progress):
                if writer.has(key):
                    skipped += 1
                    continue
                writer._append_copied(reader, key)
                copied += 1
        return {"copied": copied, "skipped": skipped, "entries": total}
    finally:
        for reader in readers:
            reader.close()


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------

def _print_stats(stats: dict) -> None:
    sizes = stats["sizes"]
    mib = 1024 * 1024
    print(f"cache {stats['cache_dir']} (format {stats['format_version']})")
    print(f"entries: {stats['entries']}  candidates: {stats['candidates']}  "
          f"per entry: {stats['candidates_per_entry']}")
    print("shards: " + ", ".join(f"{name} {count}" for name, count in stats["shards"].items()))
    print(f"size: data {sizes['data_bytes'] / mib:.2f} MiB, index {sizes['index_bytes'] / mib:.2f} MiB, "
          f"audio {sizes['audio_bytes'] / mib:.2f} MiB, {sizes['bytes_per_entry'] / 1024:.1f} KiB data per entry")
    print("acceptance rate (entries with a candidate scoring >= threshold; same for first_above and best):")
    for threshold, rate in stats["acceptance_rates"].items():
        print(f"  >= {float(threshold):4.2f}: {'n/a' if math.isnan(rate) else f'{100 * rate:5.1f} %'}")
    for label in ("scores_all", "scores_first_candidate", "scores_best_candidate"):
        s = stats[label]
        if s["count"]:
            print(f"{label}: n={s['count']} min {s['min']:.3f} mean {s['mean']:.3f} "
                  f"median {s['median']:.3f} max {s['max']:.3f}")
    hist = stats["histogram"]
    peak = max(hist["counts"]) if any(hist["counts"]) else 1
    print("CLAP score histogram:")
    for lo, hi, count in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"]):
        print(f"  [{lo:5.2f}, {hi:5.2f}) {count:8d} {'#' * round(40 * count / peak)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m audio_gen.cache",
                                     description="Check, summarise and merge audio token caches.")
    commands = parser.add_subparsers(dest="command", required=True)
    p_verify = commands.add_parser("verify", help="check every entry; exit 1 if anything is wrong")
    p_verify.add_argument("cache_dir")
    p_verify.add_argument("--quiet", action="store_true", help="no progress bar")
    p_stats = commands.add_parser("stats", help="counts, sizes, acceptance rates, score histogram")
    p_stats.add_argument("cache_dir")
    p_stats.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p_stats.add_argument("--thresholds", default=",".join(str(t) for t in DEFAULT_THRESHOLDS),
                         help="comma-separated CLAP thresholds (default %(default)s)")
    p_merge = commands.add_parser("merge", help="combine caches with the same fingerprint into OUT")
    p_merge.add_argument("out_dir")
    p_merge.add_argument("sources", nargs="+")
    p_merge.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            report = verify(args.cache_dir, progress=not args.quiet)
            for note in report.notes:
                print(f"note: {note}")
            for problem in report.problems:
                print(f"PROBLEM: {problem}")
            if report.ok:
                print(f"OK: {report.entries} entries in {report.shards} shard(s) verified")
                return 0
            print(f"FAILED: {len(report.problems)} problem(s) in {args.cache_dir} "
                  f"({report.entries} entries readable)")
            return 1
        if args.command == "stats":
            try:
                thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
            except ValueError:
                raise CacheError(f"--thresholds: expected comma-separated numbers, got {args.thresholds!r}") from None
            stats = cache_stats(args.cache_dir, thresholds)
            if args.json:
                print(json.dumps(stats, indent=2))
            else:
                _print_stats(stats)
            return 0
        result = merge(args.out_dir, args.sources, progress=not args.quiet)
        print(f"merged {result['entries']} entries from {len(args.sources)} cache(s) into {args.out_dir}: "
              f"{result['copied']} copied, {result['skipped']} already present")
        return 0
    except AudioGenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
