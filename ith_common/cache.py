"""The audio token cache (format 2, `docs/cache.md`): a content-addressed, resumable, shardable store of audio
tokens, one SQLite database per shard.  An entry is committed with its transaction (WAL, synchronous=FULL), so a
killed writer loses only its uncommitted group; readers check every entry's sha256 digest.  numpy + standard
library only (soundfile lazily, for FLAC), because the JAX trainer reads the cache through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import pathlib
import re
import sqlite3
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ith_common.atomic import fsync_directory
from ith_common.errors import UserError
from ith_common.selection import DEFAULT_THRESHOLDS, acceptance_rates

CACHE_FORMAT_VERSION = 2
FORMAT_NAME = "ith-jax-audio-cache"
SHARDS_DIR = "shards"
DTYPES = {"tokens": "<f2", "token_mask": "|b1", "clap_scores": "<f4"}  # fixed by the format
SCHEMA = ("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
          "CREATE TABLE IF NOT EXISTS entries (seq INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, digest TEXT NOT "
          "NULL, clap_scores BLOB NOT NULL, header TEXT NOT NULL, tokens BLOB NOT NULL, token_mask BLOB)",
          "CREATE TABLE IF NOT EXISTS waveforms (key TEXT NOT NULL, candidate INTEGER NOT NULL, flac BLOB NOT NULL, "
          "PRIMARY KEY (key, candidate))")
COLUMNS = "key, digest, clap_scores, header, tokens, token_mask"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})$")
Progress = Callable[[Iterable, int, str], Iterable]  # (items, total, description) -> the same items, shown


class CacheError(UserError):
    """A cache problem the user must act on (bad entry, other settings, corruption); one line."""


def canonical_json(obj: Any, what: str = "value") -> bytes:
    """The one serialisation for hashing: sorted keys, no spaces, ASCII (lone surrogates escaped), no NaN."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise CacheError(f"{what}: expected JSON-serialisable values (no NaN/inf), {exc}") from None


def entry_key(prompt: str, generator: dict, seed: int, encoder: dict) -> str:
    """sha256 hex of canonical JSON of `{"encoder", "generator", "prompt", "seed"}`: the same work always has the
    same key, so reruns find it."""
    if not isinstance(prompt, str):
        raise CacheError(f"entry_key: prompt must be a string, got {type(prompt).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CacheError(f"entry_key: seed must be an integer, got {seed!r}")
    return hashlib.sha256(canonical_json({"prompt": prompt, "generator": generator, "seed": seed,
                                          "encoder": encoder})).hexdigest()


def shard_of_key(key: str, num_shards: int) -> int:
    """Which of `num_shards` shards owns `key`: keys are sha256 hex, so their leading bits are uniform."""
    return int(key[:16], 16) % num_shards


def _check_fingerprint(where: str, stored: dict, wanted: dict, other: str = "this run") -> None:
    """Refuse other settings, naming every differing dotted key."""
    def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
        if isinstance(obj, dict) and obj:
            return {k: v for key, value in obj.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
        return {prefix[:-1] or "<root>": json.dumps(obj)}

    if stored != wanted:
        a, b = flatten(stored), flatten(wanted)
        differences = "; ".join(f"{k}: cache has {a.get(k, '(absent)')}, {other} has {b.get(k, '(absent)')}"
                                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise CacheError(f"{where}: the cache was built with other settings; differing fingerprint keys: "
                         f"{differences} (use another cache_dir, or the settings of the cache)")


@dataclasses.dataclass
class CacheEntry:
    """One prompt's K candidates: tokens float16 [K, T, D]; token_mask bool [K, T] or None when every token is
    valid (an all-True mask is stored as None); clap_scores float32 [K] (NaN: not scored); metadata a
    JSON-serialisable dict; waveforms optional float32 [K, S] or [K, C, S], kept as FLAC (24-bit, clipped to
    [-1, 1]) by a writer with `store_waveforms=True`; sample_rate in Hz, required with waveforms."""
    key: str
    prompt: str
    tokens: np.ndarray
    token_mask: np.ndarray | None
    clap_scores: np.ndarray
    metadata: dict = dataclasses.field(default_factory=dict)
    waveforms: np.ndarray | None = None
    sample_rate: int | None = None


def _entry_row(entry: CacheEntry, store_waveforms: bool) -> tuple[tuple, list[bytes]]:
    """Check an entry; its `entries` row and its waveforms as FLAC files.  Errors name the field."""
    if not isinstance(entry, CacheEntry):
        raise CacheError(f"add: expected a CacheEntry, got {type(entry).__name__}")
    if not isinstance(entry.key, str) or not _KEY_RE.match(entry.key):
        raise CacheError(f"entry.key: expected 64 lowercase hex characters (an entry_key()), got {entry.key!r:.80}")

    def fail(field: str, expected: str) -> CacheError:
        return CacheError(f"entry {entry.key[:12]}: field '{field}': {expected}")

    if not isinstance(entry.prompt, str):
        raise fail("prompt", f"expected a string, got {type(entry.prompt).__name__}")
    tokens, scores = np.asarray(entry.tokens), np.asarray(entry.clap_scores)
    mask = None if entry.token_mask is None else np.asarray(entry.token_mask)
    if tokens.ndim != 3 or min(tokens.shape) < 1 or tokens.dtype.kind != "f":
        raise fail("tokens", f"expected a float array [K, T, D] with K, T, D >= 1, got {tokens.dtype} {tokens.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        tokens16 = tokens.astype(DTYPES["tokens"])
    if not np.isfinite(tokens16).all():
        raise fail("tokens", "non-finite values after casting to float16 (float16 overflows above 65504; got "
                   f"max |x| = {np.nanmax(np.abs(tokens)):.4g})")
    k, t, _ = tokens.shape
    if mask is not None:
        binary = mask.dtype == np.bool_ or mask.dtype.kind in "iu" and np.isin(mask, (0, 1)).all()
        if mask.shape != (k, t) or not binary:
            raise fail("token_mask", f"expected booleans [K, T] = {(k, t)} like tokens, got {mask.dtype} {mask.shape}")
        if not mask.any(axis=1).all():
            raise fail("token_mask", f"candidate {int(np.flatnonzero(~mask.any(axis=1))[0])} has no valid token "
                       "(attention over it would be undefined)")
        mask = None if mask.all() else mask.astype(DTYPES["token_mask"])
    if scores.shape != (k,) or scores.dtype.kind not in "fiu":
        raise fail("clap_scores", f"expected {k} numbers [K], got {scores.dtype} {scores.shape}")
    if np.isinf(scores32 := scores.astype(DTYPES["clap_scores"])).any():  # NaN = not scored (the oracle path)
        raise fail("clap_scores", f"expected finite values or NaN (not scored), got {scores.tolist()}")
    if not isinstance(entry.metadata, dict):
        raise fail("metadata", f"expected a dict, got {type(entry.metadata).__name__}")
    metadata = json.loads(canonical_json(entry.metadata, f"entry {entry.key[:12]}: field 'metadata'"))
    flacs, rate = [], entry.sample_rate
    if store_waveforms and entry.waveforms is not None:
        waves = np.asarray(entry.waveforms)
        if waves.ndim not in (2, 3) or waves.shape[0] != k or waves.shape[-1] < 1 or waves.dtype.kind != "f" or (
                waves.ndim == 3 and not 1 <= waves.shape[1] <= 8) or not np.isfinite(waves).all():
            raise fail("waveforms", f"expected finite floats [K, S] or [K, C, S] with K = {k} and 1 to 8 channels, "
                       f"got {waves.dtype} {waves.shape}")
        if not isinstance(rate, int) or isinstance(rate, bool) or not 1 <= rate <= 655_350:
            raise fail("sample_rate", f"expected an integer sample rate in Hz (1..655350) with waveforms, got {rate!r}")
        for wave in np.clip(waves.astype(np.float32), -1.0, 1.0):
            buffer = io.BytesIO()  # soundfile wants (frames, channels)
            _soundfile().write(buffer, wave if wave.ndim == 1 else wave.T, rate, format="FLAC", subtype="PCM_24")
            flacs.append(buffer.getvalue())
    header = canonical_json({"prompt": entry.prompt, "metadata": metadata, "shape": list(tokens.shape),
                             "sample_rate": rate if flacs else None,
                             "waveforms": [hashlib.sha256(f).hexdigest() for f in flacs] or None}).decode()
    blobs = (scores32.tobytes(), tokens16.tobytes(), None if mask is None else mask.tobytes())
    return (entry.key, entry_digest(entry.key, header, *blobs), blobs[0], header, *blobs[1:]), flacs


def _soundfile():
    try:
        import soundfile  # optional: only needed when waveforms are written or read
    except ImportError:
        raise CacheError("waveforms are stored as FLAC, which needs the soundfile package "
                         "(pip install soundfile, or ith-jax[audio])") from None
    return soundfile


def entry_digest(key: str, header: str, clap_scores: bytes, tokens: bytes, token_mask: bytes | None) -> str:
    """sha256 hex of key, header, clap_scores, tokens and token_mask (nothing when NULL), concatenated."""
    return hashlib.sha256(f"{key}{header}".encode("utf-8", "replace") + clap_scores + tokens
                          + (token_mask or b"")).hexdigest()


@contextlib.contextmanager
def _sqlite_errors(path: pathlib.Path) -> Iterator[None]:
    """SQLite's errors as ours: I/O (full disk, read-only, locked) an OSError naming the file, damage a CacheError."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        name = getattr(exc, "sqlite_errorname", "")  # Python >= 3.11
        raise OSError({"SQLITE_FULL": errno.ENOSPC, "SQLITE_READONLY": errno.EROFS}.get(name, errno.EIO), str(exc),
                      str(path)) from None
    except (sqlite3.DatabaseError, ValueError) as exc:  # ValueError: a `meta` value that is not JSON
        raise CacheError(f"{path}: the shard is damaged ({exc}); run "
                         f"`python -m audio_gen.cache verify {path.parent.parent}`") from None


def _connect(path: pathlib.Path) -> tuple[sqlite3.Connection, dict]:
    """A connection to a shard and its `meta` (empty until its first writer fills it); other versions refused."""
    with _sqlite_errors(path):
        # mode=rw never creates a file (a read-only one opens read-only); INSERTs begin an IMMEDIATE transaction.
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True, isolation_level="IMMEDIATE",
                               timeout=60, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
        meta = {name: json.loads(value) for name, value in conn.execute("SELECT * FROM meta")} if has_meta else {}
    if meta and (meta.get("format") != FORMAT_NAME or meta.get("format_version") != CACHE_FORMAT_VERSION):
        conn.close()
        raise CacheError(f"{path}: meta 'format_version': this code reads {FORMAT_NAME!r} version "
                         f"{CACHE_FORMAT_VERSION}, the shard has {meta.get('format')!r} {meta.get('format_version')!r}")
    return conn, meta


def _shard_paths(cache_dir: pathlib.Path) -> list[pathlib.Path]:
    """The shard databases of a cache directory, sorted; refuses a version-1 cache."""
    if (cache_dir / "cache.json").exists() or any((cache_dir / SHARDS_DIR).glob("*.index.jsonl")):
        raise CacheError(f"{cache_dir}: a format version 1 cache (cache.json, shards/*.index.jsonl); this code "
                         f"reads version {CACHE_FORMAT_VERSION} (SQLite shards, docs/cache.md): rebuild it")
    return sorted(p for p in (cache_dir / SHARDS_DIR).glob("*.sqlite") if _SHARD_RE.match(p.stem))


class _Closing(contextlib.AbstractContextManager):
    def __exit__(self, *exc_info) -> None:
        self.close()


class CacheWriter(_Closing):
    """Adds entries to one shard of a cache directory: the keys with `shard_of_key(key, num_shards) ==
    shard_index`, one process at a time.  Entries are committed in groups of `commit_every` (1: each `add` is
    durable when it returns), one transaction per group; `flush()` and `close()` commit a partial group."""

    def __init__(self, cache_dir: str | os.PathLike, *, fingerprint: dict, num_shards: int = 1,
                 shard_index: int = 0, store_waveforms: bool = False, commit_every: int = 1):
        if not all(isinstance(n, int) for n in (num_shards, shard_index, commit_every)) or not (
                1 <= num_shards <= 99_999 and 0 <= shard_index < num_shards and commit_every >= 1):
            raise CacheError(f"num_shards={num_shards!r}, shard_index={shard_index!r}, commit_every={commit_every!r}: "
                             "expected integers, 1 <= num_shards <= 99999, 0 <= shard_index < num_shards, "
                             "commit_every >= 1")
        if not isinstance(fingerprint, dict):
            raise CacheError(f"fingerprint: expected a dict, got {type(fingerprint).__name__}")
        self.cache_dir = pathlib.Path(cache_dir)
        self.fingerprint = json.loads(canonical_json(fingerprint, "fingerprint"))  # as stored: tuples are lists
        self.num_shards, self.shard_index, self.store_waveforms = num_shards, shard_index, store_waveforms
        self.shard, self.commit_every = f"shard-{shard_index:05d}-of-{num_shards:05d}", commit_every
        self.path = self.cache_dir / SHARDS_DIR / f"{self.shard}.sqlite"
        self._pending: list[tuple[tuple, list[bytes]]] = []  # (entries row, FLAC files) not yet committed
        self._conn, self._lock = None, None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise CacheError(f"{self.cache_dir}: exists and is not a directory")
        _shard_paths(self.cache_dir)  # refuses a version-1 cache before anything is created
        for directory in (self.cache_dir, self.path.parent):
            if not directory.is_dir():
                directory.mkdir(parents=True)
                fsync_directory(directory.parent)
        self._lock = open(self.path.with_suffix(".lock"), "ab")  # held until close
        import fcntl  # POSIX only; imported here so that readers work everywhere
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"{self._lock.name}: shard {self.shard} is being written by another process (each "
                             "shard index may run once at a time)") from None
        created = not self.path.exists()
        if created:  # made here, not by SQLite (0644), so that it and its -wal/-shm get umask permissions
            self.path.touch()
            fsync_directory(self.path.parent)
        self._conn = _connect(self.path)[0]
        meta = {"format": FORMAT_NAME, "format_version": CACHE_FORMAT_VERSION, "fingerprint": self.fingerprint,
                "dtypes": DTYPES}
        with _sqlite_errors(self.path), self._conn:  # changes nothing in a shard that has its tables and meta
            for statement in SCHEMA:
                self._conn.execute(statement)
            self._conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                                   [(k, canonical_json(v).decode()) for k, v in meta.items()])
        # Every shard (ours too, before an entry is written) must have our fingerprint.  Ours exists by now, so of
        # two first writers with other settings at least one sees the other.
        try:
            with CacheReader(self.cache_dir, fingerprint=self.fingerprint) as reader:
                self._finished = set(reader.keys())  # has() is True for pending entries too
        except CacheError:
            if created:  # leave no shard with other settings behind
                self._conn.close()
                self._conn = None
                for suffix in ("", "-wal", "-shm"):
                    pathlib.Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            raise

    def owns(self, key: str) -> bool:
        return self.num_shards == 1 or shard_of_key(key, self.num_shards) == self.shard_index

    def has(self, key: str) -> bool:
        """Whether `key` is finished anywhere in the cache (as of opening, plus this writer's additions)."""
        return key in self._finished

    @property
    def pending(self) -> int:
        """Entries added but not yet committed."""
        return len(self._pending)

    def add(self, entry: CacheEntry) -> None:
        """Check and queue `entry`; committed (durable) at once with commit_every=1, else at the next commit."""
        if self._conn is None:
            raise CacheError(f"{self.cache_dir}: writer is closed")
        row, flacs = _entry_row(entry, self.store_waveforms)
        if not self.owns(entry.key):
            raise CacheError(f"entry {entry.key[:12]}: belongs to shard {shard_of_key(entry.key, self.num_shards)} "
                             f"of {self.num_shards}, this writer is shard {self.shard_index}; skip keys for which "
                             "writer.owns(key) is False")
        if self.has(entry.key):
            raise CacheError(f"entry {entry.key[:12]}: already in the cache (check writer.has(key) first)")
        self._queue(row, flacs)

    def _queue(self, row: tuple, flacs: list[bytes]) -> None:
        self._pending.append((row, flacs))
        self._finished.add(row[0])
        if len(self._pending) >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        """Commit the pending entries in one transaction (durable when this returns; on failure none of them is
        in the cache, nor in `has`)."""
        if self._conn is None:
            raise CacheError(f"{self.cache_dir}: writer is closed")
        if not self._pending:
            return
        try:
            with _sqlite_errors(self.path), self._conn:
                # WAL from the first commit on, not at opening: a rerun that adds nothing changes no byte.
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.executemany(f"INSERT OR IGNORE INTO entries ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                                       [row for row, _ in self._pending])
                self._conn.executemany("INSERT OR IGNORE INTO waveforms VALUES (?, ?, ?)",
                                       [(row[0], c, f) for row, flacs in self._pending for c, f in enumerate(flacs)])
        except BaseException:
            self._finished.difference_update(row[0] for row, _ in self._pending)
            raise
        finally:
            self._pending.clear()

    def close(self) -> None:
        """Commit pending entries, then release the shard."""
        try:
            if self._pending:
                self.flush()
        finally:
            if self._conn is not None:
                # A finished shard is one self-contained file (no -wal/-shm), readable from read-only media; not
                # possible (and skipped at once) while another process has it open.
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA busy_timeout = 0")
                    self._conn.execute("PRAGMA journal_mode=DELETE")
                self._conn.close()
                self._conn = None
            if self._lock is not None:  # the lock goes last
                self._lock.close()


class CacheReader(_Closing):
    """numpy-only view of every shard of a cache directory as one cache (its keys as of opening).  Every shard must
    have `fingerprint` (default: the first shard's).  With `skip_damaged=True` (verify) shards SQLite cannot read
    are listed in `damaged` instead of raising; shards whose first writer died before filling `meta` are listed in
    `empty`; a key in two shards is served from the first and listed in `duplicates`."""

    def __init__(self, cache_dir: str | os.PathLike, *, fingerprint: dict | None = None, skip_damaged: bool = False):
        self.cache_dir = pathlib.Path(cache_dir)
        if not self.cache_dir.is_dir():
            raise CacheError(f"{self.cache_dir}: no such cache directory")
        if not (paths := _shard_paths(self.cache_dir)):
            raise CacheError(f"{self.cache_dir}: not an audio cache (no {SHARDS_DIR}/shard-*.sqlite)")
        self.fingerprint, self.shards, self.empty, self.damaged = fingerprint, [], [], {}
        self.duplicates: list[tuple[str, str, str]] = []  # (key, shard served, shard ignored)
        self._index: dict[str, tuple[str, bytes, str | None]] = {}  # key -> (shard, clap_scores, prompt)
        self._by_prompt: dict[str, list[str]] = {}
        self._conns: dict[str, sqlite3.Connection] = {}
        try:
            for path in paths:
                self._open_shard(path, "this run" if fingerprint else None, skip_damaged)
        except BaseException:
            self.close()
            raise

    def _open_shard(self, path: pathlib.Path, other: str | None, skip_damaged: bool) -> None:
        try:
            conn, meta = _connect(path)
            with _sqlite_errors(path):
                rows = conn.execute("SELECT key, clap_scores, header FROM entries ORDER BY seq").fetchall() \
                    if meta else []
        except (CacheError, OSError) as exc:
            if not skip_damaged:
                raise
            self.damaged[path.stem] = str(exc)
            return
        if not meta:
            self.empty.append(path.stem)
            conn.close()
            return
        self._conns[path.stem] = conn
        self.fingerprint = meta["fingerprint"] if self.fingerprint is None else self.fingerprint
        _check_fingerprint(str(path), meta["fingerprint"], self.fingerprint,
                           other or f"shard {(self.shards or [path.stem])[0]}")
        self.shards.append(path.stem)
        for key, scores, header in rows:
            if key in self._index:
                self.duplicates.append((key, self._index[key][0], path.stem))
                continue
            prompt = None
            with contextlib.suppress(ValueError, KeyError, TypeError):  # malformed: verify names it
                self._by_prompt.setdefault(prompt := json.loads(header)["prompt"], []).append(key)
            self._index[key] = (path.stem, scores, prompt)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def keys(self) -> list[str]:
        """Every key, shards in name order, entries in the order they were committed."""
        return list(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def shard_of(self, key: str) -> str:
        return self._index[key][0]

    def prompt(self, key: str) -> str | None:
        return self._index[key][2]

    def clap_scores(self, key: str) -> np.ndarray:
        """The K scores of `key`, as read when opening (no token data read)."""
        return np.frombuffer(self._index[key][1], DTYPES["clap_scores"]).copy()

    def _read(self, key: str, waveforms: bool) -> tuple[tuple, CacheEntry, list[bytes]]:
        """The one way entries are read (get, verify, merge): the `entries` row, the entry without waveforms (fresh
        arrays) and, with `waveforms`, its FLAC files, all checked against the digests."""
        path = self.cache_dir / SHARDS_DIR / f"{self.shard_of(key)}.sqlite"
        where, conn = f"{path}: entry {key[:12]}", self._conns[path.stem]
        with _sqlite_errors(path):
            row = conn.execute(f"SELECT {COLUMNS} FROM entries WHERE key = ?", (key,)).fetchone()
            flacs = [f for (f,) in conn.execute("SELECT flac FROM waveforms WHERE key = ? ORDER BY candidate",
                                                (key,))] if waveforms else []
        if row is None:
            raise CacheError(f"{where}: vanished since the reader opened")
        _, digest, scores, header_text, tokens, mask = row
        if entry_digest(key, header_text, scores, tokens, mask) != digest:
            raise CacheError(f"{where}: digest mismatch, the entry is corrupted")
        try:
            header = json.loads(header_text)
            k, t, d = (int(n) for n in header["shape"])
            arrays = [None if blob is None else np.frombuffer(blob, DTYPES[name]).reshape(shape).copy() for
                      name, blob, shape in (("tokens", tokens, (k, t, d)), ("token_mask", mask, (k, t)),
                                            ("clap_scores", scores, (k,)))]
            entry = CacheEntry(key, header["prompt"], *arrays, header["metadata"],
                               sample_rate=header.get("sample_rate"))
            if not (isinstance(entry.prompt, str) and isinstance(entry.metadata, dict)):
                raise TypeError("'prompt' or 'metadata' of the wrong type")
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"{where}: malformed entry ({type(exc).__name__}: {exc})") from None
        if waveforms and [hashlib.sha256(f).hexdigest() for f in flacs] != (header.get("waveforms") or []):
            raise CacheError(f"{where}: waveforms missing or corrupted (their digests differ from the entry's)")
        return row, entry, flacs

    def get(self, key: str, *, waveforms: bool = False) -> CacheEntry:
        """The entry of `key` (fresh, writable numpy arrays), checked against its digest.  With `waveforms=True`
        the FLAC audio is decoded too (needs soundfile); otherwise `waveforms` is None."""
        _, entry, flacs = self._read(key, waveforms)
        decoded = [_soundfile().read(io.BytesIO(f), dtype="float32", always_2d=True)[0].T for f in flacs]
        entry.waveforms = np.stack([w[0] if len(w) == 1 else w for w in decoded]) if decoded else None
        return entry

    def by_prompt(self, prompt: str) -> CacheEntry | None:
        """The entry whose prompt is `prompt`, None if there is none; an error if several (use `get`)."""
        keys = self._by_prompt.get(prompt, [])
        if len(keys) > 1:
            raise CacheError(f"{self.cache_dir}: {len(keys)} entries have the prompt {prompt[:60]!r} "
                             "(different seeds?); look them up by key with get()")
        return self.get(keys[0]) if keys else None


@dataclasses.dataclass
class VerifyReport:
    entries: int = 0
    waveforms: int = 0  # stored clips (FLAC), over all entries
    shards: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)  # anything wrong: exit status 1
    notes: list[str] = dataclasses.field(default_factory=list)     # harmless leftovers of killed writers
    ok = property(lambda self: not self.problems)


def verify(cache_dir: str | os.PathLike, *, progress: Progress | None = None) -> VerifyReport:
    """`PRAGMA integrity_check` of every shard, then every entry: key, owner shard, digest, shapes, finite values,
    waveform digests; and duplicates across shards.  Each problem names the shard and the entry."""
    with CacheReader(cache_dir, skip_damaged=True) as reader:
        report = VerifyReport(shards=len(reader.shards) + len(reader.damaged),
                              problems=[f"shard {shard}: cannot read ({why})" for shard, why in reader.damaged.items()],
                              notes=[f"shard {s}: empty (its first writer was killed while creating it)"
                                     for s in reader.empty])
        for shard, conn in reader._conns.items():
            with _sqlite_errors(reader.cache_dir / SHARDS_DIR / f"{shard}.sqlite"):
                if (result := [r for (r,) in conn.execute("PRAGMA integrity_check")]) != ["ok"]:
                    report.problems.append(f"shard {shard}: integrity_check: {'; '.join(result[:3])}")
        report.problems += [f"shard {later}: entry {key[:12]} is a duplicate of the one in shard {first}"
                            for key, first, later in reader.duplicates]
        for key in (progress or (lambda items, total, description: items))(reader.keys(), len(reader), "verify"):
            shard = reader.shard_of(key)
            index, count = (int(n) for n in _SHARD_RE.match(shard).groups())
            try:
                if not _KEY_RE.match(key):
                    raise CacheError("the key is not 64 lowercase hex characters")
                if shard_of_key(key, count) != index:
                    raise CacheError(f"belongs to shard {shard_of_key(key, count)} of {count}")
                _, entry, flacs = reader._read(key, waveforms=True)
                if not np.isfinite(entry.tokens).all() or np.isinf(entry.clap_scores).any():
                    raise CacheError("non-finite tokens or infinite scores")
                if entry.token_mask is not None and not entry.token_mask.any(axis=1).all():
                    raise CacheError("a candidate has no valid token")
                report.entries += 1
                report.waveforms += len(flacs)
            except (CacheError, OSError) as exc:
                report.problems.append(f"shard {shard}: entry {key[:12]}: {str(exc).rpartition(key[:12] + ': ')[2]}")
    return report


def cache_stats(cache_dir: str | os.PathLike, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                bins: int = 20) -> dict:
    """Counts, sizes, acceptance rates per threshold and a histogram of every CLAP score."""
    with CacheReader(cache_dir) as reader:
        scores = [reader.clap_scores(key) for key in reader]
        owners = [reader.shard_of(key) for key in reader]
        audio = sum(conn.execute("SELECT total(length(flac)) FROM waveforms").fetchone()[0]
                    for conn in reader._conns.values())
        fingerprint, shards = reader.fingerprint, {s: owners.count(s) for s in reader.shards}
    shard_bytes = sum(p.stat().st_size for p in (pathlib.Path(cache_dir) / SHARDS_DIR).glob("*.sqlite*"))
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)  # binned as stored (float32)
    counts, edges = np.histogram(all_scores, bins=bins, range=(-1.0, 1.0))

    def summary(values: Sequence[float]) -> dict:  # over scored candidates: NaN means "not scored"
        values = np.asarray(values, np.float64)[~np.isnan(values)]
        return {"count": int(values.size), "min": float(values.min()), "mean": float(values.mean()),
                "median": float(np.median(values)), "max": float(values.max())} if values.size else {"count": 0}

    candidates = [len(s) for s in scores]
    return {"cache_dir": str(cache_dir), "format_version": CACHE_FORMAT_VERSION, "fingerprint": fingerprint,
            "entries": len(scores), "shards": shards, "candidates": int(sum(candidates)),
            "candidates_per_entry": {str(k): candidates.count(k) for k in sorted(set(candidates))},
            "sizes": {"shard_bytes": shard_bytes, "audio_bytes": int(audio),
                      "bytes_per_entry": shard_bytes / len(scores) if scores else 0.0},
            "acceptance_rates": {str(t): r for t, r in acceptance_rates(scores, thresholds).items()},
            "scores_all": summary(all_scores), "scores_first_candidate": summary([s[0] for s in scores]),
            "scores_best_candidate": summary([np.fmax.reduce(s) for s in scores]),  # fmax: NaN only if all are
            "unscored_candidates": int(np.isnan(all_scores).sum()),
            "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}}


def merge(out_dir: str | os.PathLike, sources: Sequence[str | os.PathLike], *,
          progress: Progress | None = None) -> dict:
    """Copy every entry of `sources` into shard 0 of 1 of `out_dir` (created if needed), without duplicates.  Every
    source must pass `verify` (a damaged or hostile source never reaches `out_dir`) and share one fingerprint with
    the others and an existing `out_dir`.  Rows and FLAC blobs are copied as stored; keys `out_dir` has are
    skipped, so a merge can be rerun after an interruption."""
    out_dir, sources = pathlib.Path(out_dir), [pathlib.Path(s) for s in sources]
    if not sources:
        raise CacheError("merge: give at least one source cache")
    with contextlib.ExitStack() as stack:
        readers = []
        for source in sources:
            if source.resolve() == out_dir.resolve():
                raise CacheError(f"merge: source {source} is the output directory")
            readers.append(stack.enter_context(CacheReader(source)))
            _check_fingerprint(f"merge: {source}", readers[-1].fingerprint, readers[0].fingerprint,
                               str(readers[0].cache_dir))
        for source in sources:
            if not (report := verify(source, progress=progress)).ok:
                raise CacheError(f"merge: source {source} fails verify ({len(report.problems)} problem(s), the "
                                 f"first: {report.problems[0]})")
        total, copied = sum(len(r) for r in readers), 0
        # 32 entries per transaction bound the rows and FLAC blobs held in memory.
        with CacheWriter(out_dir, fingerprint=readers[0].fingerprint or {}, commit_every=32) as writer:
            for reader in readers:
                for key in (key for key in reader if not writer.has(key)):
                    row, _, flacs = reader._read(key, waveforms=True)
                    writer._queue(row, flacs)
                    copied += 1
        return {"copied": copied, "skipped": total - copied, "entries": total}
