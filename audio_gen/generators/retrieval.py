"""AudioBERT-style retrieval backend: CLAP text-to-audio nearest neighbours over a local folder of audio files.

Instead of generating K candidates per prompt, the K audio files of a library whose CLAP audio embeddings
are closest (cosine) to the span's CLAP text embedding become the K candidates; their similarities are the
`clap_scores`, so the selection rules of `ith_common.selection` apply unchanged (candidates come sorted
best-first). Candidates are encoded with the same encoder interface as generation
(`audio_gen.encoders.build_encoder`: `encode(waveforms, sample_rate) -> (tokens [N, T, D] float16,
mask [N, T] bool)`, `settings()`, `sample_rate`) and written in the same cache format (docs/cache.md).

    python -m audio_gen.generators.retrieval --audio_dir sounds/ --spans spans.jsonl --cache_dir workdirs/ret \
        [--clap_model laion/clap-htsat-fused] [--encoder ast] [--num_tokens 8] [--top_k 5] \
        [--num_shards N --shard_index I] [--embeddings FILE] [--store_waveforms]

Library embeddings are cached in a small `.npz` (default `<cache_dir>/retrieval_library.npz`) keyed by each
file's relative path, mtime and size and by the CLAP model's identity: only new or changed files are
embedded again; the file is replaced atomically.

The library enters the cache fingerprint and every entry key through a digest of (path, size, mtime) of all
files, so a cache built over one library is never silently extended with neighbours from another.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from ith_common.atomic import atomic_write_with, check_output_dir
from ith_common.cache import CacheEntry, CacheWriter, canonical_json, entry_key
from ith_common.errors import UserError, run_main
from ith_common.prompts import DEFAULT_PROMPT_TEMPLATE, build_prompt, check_template, normalise_span_text

AUDIO_EXTENSIONS = (".wav", ".flac")
LIBRARY_FORMAT_VERSION = 1
GENERATOR_NAME = "retrieval"


@dataclasses.dataclass(frozen=True)
class LibraryFile:
    path: str  # relative to the library folder, POSIX separators
    size: int
    mtime_ns: int


@dataclasses.dataclass
class AudioLibrary:
    """A folder of audio files with one L2-normalised CLAP audio embedding per file."""
    folder: pathlib.Path
    files: list[LibraryFile]
    embeddings: np.ndarray  # float32 [N, P]
    clap_model: str         # canonical JSON of the scorer's settings

    def digest(self) -> str:
        """Identifies the library's contents (names, sizes, mtimes) and the CLAP model that embedded them."""
        listing = [[f.path, f.size, f.mtime_ns] for f in self.files]
        return hashlib.sha256(canonical_json({"files": listing, "clap": self.clap_model})).hexdigest()


def scan_audio_folder(folder: str | os.PathLike) -> list[LibraryFile]:
    """Every .wav/.flac under `folder` (recursively, hidden entries skipped), sorted by relative path."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: audio library folder does not exist")
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
            stat = path.stat()
            files.append(LibraryFile(relative.as_posix(), int(stat.st_size), int(stat.st_mtime_ns)))
    if not files:
        raise UserError(f"{folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in the library folder")
    return files


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate) of a wav/flac file; channels are averaged."""
    import soundfile

    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise UserError(f"{path}: cannot read audio ({exc})") from None
    if samples.shape[0] == 0:
        raise UserError(f"{path}: audio file has no samples")
    return samples.mean(axis=1).astype(np.float32), int(rate)


def _read_embeddings_file(path: pathlib.Path, clap_model: str) -> dict[LibraryFile, np.ndarray]:
    """Embeddings stored for `clap_model`, by file identity; {} when missing, stale or unreadable."""
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            if int(archive["format_version"]) != LIBRARY_FORMAT_VERSION or str(archive["clap_model"]) != clap_model:
                return {}
            listing = json.loads(str(archive["files"]))
            embeddings = np.asarray(archive["embeddings"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as exc:
        print(f"warning: {path}: ignoring unreadable library embeddings ({exc}); recomputing", file=sys.stderr)
        return {}
    if len(listing) != len(embeddings):
        return {}
    return {LibraryFile(*item): row for item, row in zip(listing, embeddings)}


def _write_embeddings_file(path: pathlib.Path, library: AudioLibrary) -> None:
    def write(tmp: pathlib.Path) -> None:
        # Through a handle: given a file name, np.savez would append ".npz" to the temporary name.
        with open(tmp, "wb") as handle:
            np.savez(handle, format_version=np.int64(LIBRARY_FORMAT_VERSION), clap_model=np.str_(library.clap_model),
                     files=np.str_(json.dumps([[f.path, f.size, f.mtime_ns] for f in library.files])),
                     embeddings=library.embeddings.astype(np.float32))

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, write)


def index_audio_folder(folder: str | os.PathLike, scorer, embeddings_path: str | os.PathLike, *,
                       batch_size: int = 16, progress: bool = True) -> AudioLibrary:
    """Embed every audio file of `folder` with `scorer` (a `ClapScorer`), reusing `embeddings_path`.

    Files whose (path, size, mtime) and CLAP model match a stored row are not read again; the embeddings file
    is rewritten (atomically) only when something changed.
    """
    folder = pathlib.Path(folder)
    embeddings_path = pathlib.Path(embeddings_path)
    clap_model = canonical_json(scorer.settings()).decode("ascii")
    files = scan_audio_folder(folder)
    stored = _read_embeddings_file(embeddings_path, clap_model)
    missing = [f for f in files if f not in stored]
    computed: dict[LibraryFile, np.ndarray] = {}
    if missing:
        from tqdm import tqdm

        bar = tqdm(total=len(missing), desc="embed library", unit="file", disable=not progress, file=sys.stderr)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            loaded = [load_audio(folder / f.path) for f in chunk]
            # Clips may differ in rate: embed each rate group with its own call.
            for rate in sorted({r for _, r in loaded}):
                members = [i for i, (_, r) in enumerate(loaded) if r == rate]
                vectors = scorer.embed_audio([loaded[i][0] for i in members], rate)
                for i, vector in zip(members, vectors):
                    vector = np.asarray(vector, dtype=np.float32)
                    # Normalised once, when computed: stored rows are reused as they are, so a reload is exact.
                    computed[chunk[i]] = vector / np.maximum(np.linalg.norm(vector), 1e-12)
            bar.update(len(chunk))
        bar.close()
    embeddings = np.stack([computed[f] if f in computed else stored[f] for f in files])
    library = AudioLibrary(folder, files, embeddings.astype(np.float32), clap_model)
    if missing or len(stored) != len(files):
        _write_embeddings_file(embeddings_path, library)
    return library


def retrieve(library: AudioLibrary, text_embeddings: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices [M, K] and cosine similarities [M, K] of the top-K files per text, best first (ties: lower index)."""
    if not 1 <= top_k <= len(library.files):
        raise UserError(f"top_k: expected 1..{len(library.files)} (the number of library files), got {top_k}")
    text = np.asarray(text_embeddings, dtype=np.float32)
    text = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    similarities = text @ library.embeddings.T  # [M, N]
    # Stable sort on the negated scores keeps the lower file index first among equal scores.
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :top_k]
    return order, np.take_along_axis(similarities, order, axis=1).astype(np.float32)


def retrieval_settings(library: AudioLibrary, top_k: int) -> dict[str, Any]:
    """The `generator` part of entry keys and of the fingerprint."""
    return {"name": GENERATOR_NAME, "top_k": int(top_k), "library_digest": library.digest(),
            "library_files": len(library.files), "clap": json.loads(library.clap_model)}


def collect_spans(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Distinct span texts (whitespace-normalised, as prompts are built), in first-seen order, from manifests
    (.jsonl) and plain lists (.txt, # comments)."""
    from ith_common.manifest import iter_spans, read_manifest

    spans: dict[str, None] = {}
    for path in paths:
        path = pathlib.Path(path)
        if path.suffix == ".jsonl":
            for _, _, text in iter_spans(read_manifest(path)):
                spans.setdefault(normalise_span_text(text), None)
        elif path.suffix == ".txt":
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"{path}: cannot read span list ({exc})") from None
            for line in lines:
                text = normalise_span_text(line)
                if text and not text.startswith("#"):
                    spans.setdefault(text, None)
        else:
            raise UserError(f"{path}: expected a span manifest (.jsonl) or a span list (.txt)")
    spans.pop("", None)  # a manifest span of only whitespace
    return list(spans)


def build_retrieval_cache(spans: Sequence[str], library: AudioLibrary, scorer, encoder,
                          cache_dir: str | os.PathLike, *, top_k: int = 5,
                          prompt_template: str = DEFAULT_PROMPT_TEMPLATE, num_shards: int = 1, shard_index: int = 0,
                          store_waveforms: bool = False, batch_size: int = 32, progress: bool = True) -> dict:
    """Retrieve top-K library files for every span and write them as cache entries.

    The CLAP query is the whitespace-normalised span text (ITH scores candidates against the span); the entry's
    prompt is `ith_common.prompts.build_prompt(span, prompt_template)`, as in generation caches, so the trainer
    looks entries up the same way.
    `encoder` is any object with the encoder interface (see the module docstring). Returns a summary dict.
    """
    from tqdm import tqdm

    from audio_gen.clap import resample  # soxr, the resampler generation uses

    check_template(prompt_template)
    generator = retrieval_settings(library, top_k)
    encoder_settings = encoder.settings()
    fingerprint = {"generator": generator, "encoder": encoder_settings, "num_tokens": encoder.num_tokens,
                   "clap_model": json.loads(library.clap_model), "num_candidates": int(top_k)}
    token_memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # a file's tokens do not depend on the prompt
    wave_memo: dict[int, np.ndarray] = {}
    summary = {"spans": len(spans), "added": 0, "skipped": 0, "other_shards": 0}

    def file_tokens(indices: Iterable[int]) -> None:
        todo = [int(i) for i in dict.fromkeys(indices) if int(i) not in token_memo]
        if not todo:
            return
        clips = []
        for i in todo:
            samples, rate = load_audio(library.folder / library.files[i].path)
            clips.append(resample(samples, rate, encoder.sample_rate))
            if store_waveforms:
                wave_memo[i] = clips[-1]
        tokens, mask = encoder.encode(clips, encoder.sample_rate)
        for i, t, m in zip(todo, tokens, mask):
            token_memo[i] = (np.asarray(t, dtype=np.float16), np.asarray(m, dtype=bool))

    with CacheWriter(cache_dir, fingerprint=fingerprint, num_shards=num_shards, shard_index=shard_index,
                     store_waveforms=store_waveforms, commit_every=batch_size) as writer:
        work = []
        for span in dict.fromkeys(normalise_span_text(span) for span in spans):
            prompt = build_prompt(span, prompt_template)
            key = entry_key(prompt, generator, 0, encoder_settings)
            if not writer.owns(key):
                summary["other_shards"] += 1
            elif writer.has(key):
                summary["skipped"] += 1
            else:
                work.append((span, prompt, key))
        bar = tqdm(total=len(work), desc="retrieve", unit="prompt", disable=not progress, file=sys.stderr)
        for start in range(0, len(work), batch_size):
            batch = work[start:start + batch_size]
            indices, scores = retrieve(library, scorer.embed_text([span for span, _, _ in batch]), top_k)
            file_tokens(indices.ravel())
            for (span, prompt, key), row, row_scores in zip(batch, indices, scores):
                tokens = np.stack([token_memo[int(i)][0] for i in row])
                mask = np.stack([token_memo[int(i)][1] for i in row])
                waves = None
                if store_waveforms:
                    length = max(len(wave_memo[int(i)]) for i in row)
                    waves = np.zeros((len(row), length), np.float32)  # zero-padded to the longest clip
                    for k, i in enumerate(row):
                        waves[k, :len(wave_memo[int(i)])] = wave_memo[int(i)]
                writer.add(CacheEntry(
                    key=key, prompt=prompt, tokens=tokens, token_mask=mask, clap_scores=row_scores,
                    metadata={"generator": GENERATOR_NAME, "query": span, "seed": 0,
                              "files": [library.files[int(i)].path for i in row],
                              "frames": [int(len(wave_memo[int(i)])) for i in row] if store_waveforms else None},
                    waveforms=waves, sample_rate=encoder.sample_rate if store_waveforms else None))
                summary["added"] += 1
            bar.update(len(batch))
        bar.close()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m audio_gen.generators.retrieval",
                                     description="Fill an audio cache with CLAP nearest neighbours from a folder.")
    parser.add_argument("--audio_dir", required=True, help="folder of .wav/.flac files (searched recursively)")
    parser.add_argument("--spans", required=True, nargs="+", help="span manifests (.jsonl) and/or lists (.txt)")
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--embeddings", default=None,
                        help="library embeddings file (default <cache_dir>/retrieval_library.npz)")
    parser.add_argument("--clap_model", default="laion/clap-htsat-fused")
    parser.add_argument("--encoder", default="ast", help="ast | clap | logmel")
    parser.add_argument("--encoder_model", default="", help="default: the encoder's default checkpoint")
    parser.add_argument("--num_tokens", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--prompt_template", default=DEFAULT_PROMPT_TEMPLATE)
    parser.add_argument("--num_shards", type=int, default=1)
    parser.add_argument("--shard_index", type=int, default=0)
    parser.add_argument("--store_waveforms", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    # Fail on bad input and unwritable outputs before importing torch and loading models.
    spans = collect_spans(args.spans)
    check_template(args.prompt_template)
    scan_audio_folder(args.audio_dir)
    check_output_dir(args.cache_dir, what="--cache_dir")
    from audio_gen.clap import ClapScorer
    from audio_gen.encoders import build_encoder

    scorer = ClapScorer(args.clap_model, device=args.device)
    encoder_model = args.encoder_model or (args.clap_model if args.encoder == "clap" else None)
    encoder = build_encoder(args.encoder, encoder_model, args.num_tokens, device=args.device)
    embeddings = args.embeddings or str(pathlib.Path(args.cache_dir) / "retrieval_library.npz")
    library = index_audio_folder(args.audio_dir, scorer, embeddings, progress=not args.no_progress)
    summary = build_retrieval_cache(spans, library, scorer, encoder, args.cache_dir, top_k=args.top_k,
                                    prompt_template=args.prompt_template, num_shards=args.num_shards,
                                    shard_index=args.shard_index, store_waveforms=args.store_waveforms,
                                    batch_size=args.batch_size, progress=not args.no_progress)
    print(f"retrieval: {summary['spans']} spans, {len(library.files)} library files: {summary['added']} added, "
          f"{summary['skipped']} already cached, {summary['other_shards']} left to other shards -> {args.cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
