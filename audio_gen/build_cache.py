r"""Generate, score, select-ready and encode imagined audio for every span into the embedding cache.

    python -m audio_gen.build_cache --config configs/gen.py --config.spans=gold.jsonl \
        --config.cache_dir=workdirs/audio_cache [--num_shards N --shard_index I]

Pipeline (ITH's, batched; the settings live in configs/gen.py):

1. Read the span manifests (and/or ``.txt`` span lists), build the prompt of each span
   (``prompt_template``, ITH: "{span} sound") and deduplicate identical prompts across all files.
2. Keep the prompts this shard owns (`CacheWriter.owns`) and drop the ones already in the cache (a rerun
   or a resumed run redoes nothing).
3. For ``batch_size`` prompts at a time: generate K candidates each (per-prompt seeds), score every
   candidate against its span text with CLAP, encode every candidate into T audio tokens, and add one cache
   entry per prompt (K token sets, K scores; the selection rule and threshold are chosen at training time).
   With ``clap_scoring = False`` (the ORACLE variant, ``configs/gen.py:oracle``) CLAP is neither loaded nor
   run: every score is stored as NaN ("not scored"), the fingerprint's ``clap`` is ``{"skipped": true}``, and
   the reports say to train with ``audio.selection=first``.
4. Print a summary (prompts, generated, reused, acceptance rate per threshold) and write it as JSON, plus a
   PNG histogram of the CLAP scores, into the cache directory (both atomically; one pair per shard).

``--num_shards``/``--shard_index``/``--spans``/``--cache_dir`` are shorthands for the ``--config.*`` keys.
Under a launcher -- ``torchrun`` (``RANK``/``WORLD_SIZE``, ``LOCAL_RANK`` for the device) or Slurm's ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``, ``SLURM_LOCALID``) -- a process given no shard on the command line takes shard
RANK of WORLD_SIZE, and with ``device=auto`` the GPU ``cuda:<local rank>`` (CPU without CUDA); one log line names
the variables used.  Shards given on the command line must agree with the launcher's (`apply_launcher`).
Errors about the input (including a ``cache_dir`` that cannot be written, checked before any model is loaded)
print ``error: <message>`` and exit with status 2; a failing disk (full, read-only) prints one ``error: <path>:
<reason>`` line and exits with status 1.  Nothing half-written is left: every cache entry is committed
atomically by the cache, the entries committed before a failure stay, and a rerun resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Callable, Sequence

import numpy as np

from ith_common.atomic import atomic_write_text, atomic_write_with, check_output_dir
from ith_common.errors import UserError, run_main
from ith_common.prompts import build_prompt, check_template, normalise_span_text

SUMMARY_NAME = "build_summary"
HISTOGRAM_NAME = "clap_scores"
UNSCORED_ADVICE = "train with audio.selection=first"
PITCH_TABLE_COMMAND = "python -m audio_gen.pitch_table --data pitch/train.csv pitch/dev.csv --out oracle_pitch.json"


@dataclasses.dataclass
class PromptItem:
    """One distinct prompt and the span text it was built from."""
    prompt: str
    span_text: str
    occurrences: int = 1
    first_seen: str = ""  # "file:line" of its first span, for messages


# ------------------------------------------------------------------------------------------------ prompts

def read_span_list(path: pathlib.Path) -> list[tuple[str, str]]:
    """A ``.txt`` span list: one span text per line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not valid UTF-8 text") from None
    spans = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            spans.append((stripped, f"{path}:{number}"))
    return spans


def read_spans(path_text: str) -> list[tuple[str, str]]:
    """(span text, where) for every span of a manifest (.jsonl) or span list (.txt)."""
    path = pathlib.Path(path_text)
    if not path.is_file():
        raise UserError(f"config key 'spans': {path_text} does not exist (expected a span manifest .jsonl "
                        "or a span list .txt)")
    if path.suffix == ".txt":
        return read_span_list(path)
    from ith_common.manifest import iter_spans, read_manifest

    records = read_manifest(path)
    return [(text, f"{path}:{record_id}#{index}") for record_id, index, text in iter_spans(records)]


def collect_prompts(paths: Sequence[str], template: str, max_prompts: int = 0) -> tuple[list[PromptItem], int]:
    """Distinct prompts in first-seen order across all files, and the total number of spans read."""
    check_template(template)
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise UserError("config key 'spans': give one or more span manifests (.jsonl) or span lists (.txt), "
                        "e.g. --config.spans=gold_dev.jsonl,gold_test.jsonl")
    by_prompt: dict[str, PromptItem] = {}
    total = 0
    for path in paths:
        for raw_text, where in read_spans(path):
            span_text = normalise_span_text(raw_text)
            if not span_text:
                continue
            total += 1
            prompt = build_prompt(span_text, template)
            item = by_prompt.get(prompt)
            if item is None:
                by_prompt[prompt] = PromptItem(prompt, span_text, 1, where)
            else:
                item.occurrences += 1
    items = list(by_prompt.values())
    if max_prompts and max_prompts > 0:
        items = items[:max_prompts]
    return items, total


# ------------------------------------------------------------------------------------------------ components

def encoder_model_for(config) -> str | None:
    """The checkpoint of the configured encoder ("" = its default; "tiny:" = its tiny counterpart)."""
    from audio_gen.encoders import DEFAULT_ENCODER_MODELS

    name, model = config.encoder, config.encoder_model
    if name == "logmel":
        return None
    if model == "tiny:":
        if name == "clap":
            return config.clap_model if config.clap_model.startswith("tiny:") else "tiny:clap_fused"
        return "tiny:ast"
    if not model:
        return config.clap_model if name == "clap" else DEFAULT_ENCODER_MODELS[name]
    return model


def check_oracle_config(config) -> None:
    """The oracle variant's requirements, checked before anything is loaded or written."""
    if not config.oracle:
        return
    if config.generator != "tone":
        raise UserError(f"config key 'generator': the oracle variant renders tones, expected 'tone', "
                        f"got {config.generator!r}")
    if not config.tone_frequencies:
        raise UserError("configs/gen.py:oracle needs --config.tone_frequencies=TABLE.json, the ORACLE pitch table "
                        f"written by `{PITCH_TABLE_COMMAND}`")


def scoring_skipped_message(config) -> str:
    reason = "oracle path" if config.oracle else "clap_scoring=False"
    return f"CLAP scoring skipped ({reason}): {UNSCORED_ADVICE}"


def oracle_coverage(config, generator, items: Sequence[PromptItem], log: Callable[[str], None]) -> dict:
    """How many prompts the ORACLE pitch table covers; the rest get hashed, uninformative pitches.  None covered
    means a table for other prompts (another prompt_template, another task): an error, before anything is written."""
    missing = [item for item in items if generator.table_frequency(item.prompt) is None]
    if items and len(missing) == len(items):
        raise UserError(f"config key 'tone_frequencies': {config.tone_frequencies}: none of the {len(items)} prompts "
                        f"is in the ORACLE pitch table (e.g. {missing[0].prompt!r}, first seen at "
                        f"{missing[0].first_seen}); build the table from the same task with prompt_template "
                        f"{config.prompt_template!r}: {PITCH_TABLE_COMMAND}")
    if missing:
        log(f"ORACLE: {len(missing)} of {len(items)} prompts are not in the pitch table and get hashed pitches "
            f"(e.g. {missing[0].prompt!r})")
    return {"note": "ORACLE: tone pitches fitted to the labelled answers; a ceiling, not a result",
            "tone_frequencies": str(config.tone_frequencies), "prompts_in_table": len(items) - len(missing),
            "prompts_not_in_table": len(missing)}


def build_components(config):
    """(generator, scorer, encoder) from the config; the scorer is None when CLAP scoring is off."""
    from audio_gen.encoders import build_encoder
    from audio_gen.generators import build_generator

    generator = build_generator(config)
    scorer = None
    if config.clap_scoring:
        from audio_gen.clap import ClapScorer

        scorer = ClapScorer(config.clap_model, device=config.device, dtype=config.clap_dtype,
                            batch_size=config.clap_batch_size)
    encoder_dtype = config.clap_dtype if config.encoder == "clap" else config.encoder_dtype
    encoder = build_encoder(config.encoder, encoder_model_for(config), config.num_tokens, device=config.device,
                            dtype=encoder_dtype, batch_size=config.encoder_batch_size)
    return generator, scorer, encoder


def fingerprint_for(config, generator, scorer, encoder) -> dict:
    """What every entry of one cache shares; opening a cache with a different one is refused (by key name)."""
    return {
        "generator": generator.settings(),
        "num_candidates": int(config.num_candidates),
        "prompt_template": config.prompt_template,
        "seed": int(config.seed),
        # Unscored caches never mix with scored ones (and say so): the fingerprint records the skip.
        "clap": scorer.settings() if scorer is not None else {"skipped": True},
        "encoder": encoder.settings(),
    }


# ------------------------------------------------------------------------------------------------ outputs

def _remove_stale_temporaries(path: pathlib.Path) -> None:
    """Temporary files of `path` that a run killed mid-write left behind (the shard lock guarantees that no live
    writer of this report exists)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def write_histogram(path: pathlib.Path, scores: np.ndarray, thresholds: Sequence[float], rates: dict,
                    title: str, *, skipped: str | None = None) -> None:
    """The PNG histogram of every CLAP score; with `skipped` (no scores) a figure that says so instead.  The
    title (and `skipped`) also go into the PNG's Description text chunk, for tools that read no pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if skipped:
        axes.set_axis_off()
        axes.text(0.5, 0.5, skipped.replace(": ", ":\n"), ha="center", va="center", fontsize=12,
                  transform=axes.transAxes)
        axes.set_title(title, fontsize=10)
        _remove_stale_temporaries(path)
        atomic_write_with(path, lambda tmp: figure.savefig(tmp, format="png",
                                                           metadata={"Description": f"{title}. {skipped}"}))
        plt.close(figure)
        return
    if scores.size:
        # Fixed-width bins over at least [-0.2, 1] so that bars and threshold lines compare across runs.
        edges = np.linspace(min(-0.2, float(scores.min())), max(1.0, float(scores.max())), 61)
        axes.hist(scores, bins=edges, color="#4C72B0", alpha=0.85)
    for threshold in thresholds:
        rate = rates.get(float(threshold), float("nan"))
        axes.axvline(threshold, color="#C44E52", linestyle="--", linewidth=1)
        axes.text(threshold, axes.get_ylim()[1] * 0.95, f" {rate:.0%}", color="#C44E52", fontsize=8, va="top")
    axes.set_xlabel("CLAP score of every candidate (cosine); dashed: thresholds, % of prompts accepted")
    axes.set_ylabel("candidates")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    _remove_stale_temporaries(path)
    atomic_write_with(path, lambda tmp: figure.savefig(tmp, format="png", metadata={"Description": title}))
    plt.close(figure)


def _shard_suffix(config) -> str:
    return "" if config.num_shards == 1 else f"-shard-{config.shard_index:05d}-of-{config.num_shards:05d}"


def format_summary(summary: dict) -> str:
    lines = [
        f"spans read: {summary['spans']}  distinct prompts: {summary['prompts']}"
        + (f"  (this shard: {summary['prompts_in_shard']})" if summary["num_shards"] > 1 else ""),
        f"generated: {summary['generated']}  reused from the cache: {summary['reused']}  "
        f"clips: {summary['generated'] * summary['num_candidates']}",
        summary["clap_scoring"] if summary["acceptance"] is None else
        "acceptance rate (some candidate >= threshold): "
        + "  ".join(f"{float(t):.1f}: {r:.1%}" if r == r else f"{float(t):.1f}: n/a"
                    for t, r in summary["acceptance"].items()),
        f"time: {summary['seconds']['total']:.1f} s in all"
        + (f" ({summary['seconds_per_generated_prompt']:.2f} s per generated prompt)"
           if summary["generated"] else ""),
        f"summary: {summary['files']['summary']}  histogram: {summary['files']['histogram']}",
    ]
    if summary.get("oracle"):
        oracle = summary["oracle"]
        lines.insert(0, f"{oracle['note']} ({oracle['tone_frequencies']}: {oracle['prompts_in_table']} prompts in the "
                        f"table, {oracle['prompts_not_in_table']} with hashed pitches)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ launchers

# (launcher, rank variable, world-size variable, local-rank variable), innermost launcher first: torchrun started
# inside a Slurm step sees both sets, and its own are the ones that number the processes it started.
LAUNCHER_VARIABLES = (("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
                      ("Slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
SHARD_KEYS = ("num_shards", "shard_index")


@dataclasses.dataclass(frozen=True)
class LauncherShard:
    """This process's place among the processes a launcher started, read from its environment variables."""
    launcher: str
    rank: int
    world_size: int
    local_rank: int | None
    variables: str  # "RANK=1 WORLD_SIZE=2 LOCAL_RANK=1", for the log


def _int_variable(environ, name: str, launcher: str) -> int:
    text = environ[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={environ[name]!r} ({launcher}): expected an integer") from None
    if value < 0:
        raise UserError(f"environment variable {name}={value} ({launcher}): expected an integer >= 0")
    return value


def launcher_shard(environ) -> LauncherShard | None:
    """The launcher's rank and world size from ``environ`` (torchrun's variables first, then Slurm's), or None when
    no launcher started this process.  Half a pair, a non-integer or a rank outside the world is a `UserError`."""
    for launcher, rank_name, size_name, local_name in LAUNCHER_VARIABLES:
        present = [name for name in (rank_name, size_name) if name in environ]
        if not present:
            continue
        if len(present) == 1:
            missing = size_name if present == [rank_name] else rank_name
            raise UserError(f"environment variable {present[0]} is set but {missing} is not; a {launcher} launch "
                            f"sets both (unset {present[0]} to run one process)")
        rank, world_size = _int_variable(environ, rank_name, launcher), _int_variable(environ, size_name, launcher)
        if world_size < 1 or rank >= world_size:
            raise UserError(f"environment variables {rank_name}={rank} {size_name}={world_size} ({launcher}): "
                            f"expected 0 <= {rank_name} < {size_name}")
        local_rank = _int_variable(environ, local_name, launcher) if local_name in environ else None
        shown = [f"{rank_name}={rank}", f"{size_name}={world_size}"]
        if local_rank is not None:
            shown.append(f"{local_name}={local_rank}")
        return LauncherShard(launcher, rank, world_size, local_rank, " ".join(shown))
    return None


def _launcher_device(shard: LauncherShard) -> str:
    """The device of a launched process whose config says ``auto``: its local rank's GPU, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if shard.local_rank is None:
        return "auto"  # no local rank to choose by: the usual automatic choice
    count = torch.cuda.device_count()
    if shard.local_rank < count:
        return f"cuda:{shard.local_rank}"
    if count == 1:  # the launcher already gave each process its own GPU (CUDA_VISIBLE_DEVICES per task)
        return "cuda:0"
    raise UserError(f"local rank {shard.local_rank} ({shard.variables}) but only {count} CUDA devices are visible; "
                    "expected one device per process on each machine (or set --config.device)")


def apply_launcher(config, *, explicit: set[str], environ=None, log: Callable[[str], None] | None = None):
    """Sets ``num_shards``/``shard_index`` (and ``device`` when it is ``auto``) from the launcher's variables.

    ``explicit`` names the shard keys given on the command line: those are kept and must agree with the launcher
    (a process told to be shard 0 of 3 by its flags and 1 of 2 by torchrun is a mistake, not a choice).  The config
    file's defaults (1 and 0) can't tell "one process" from "not said", which is why the command line decides.
    Returns the `LauncherShard` used, or None without a launcher (the config is then left alone)."""
    environ = os.environ if environ is None else environ
    log = log or (lambda message: print(message, file=sys.stderr))
    shard = launcher_shard(environ)
    if shard is None:
        return None
    wanted = {"num_shards": shard.world_size, "shard_index": shard.rank}
    for key in SHARD_KEYS:
        if key in explicit and int(config[key]) != wanted[key]:
            raise UserError(f"config key '{key}' is {config[key]} on the command line but the launcher says "
                            f"{wanted[key]} ({shard.launcher}: {shard.variables}); give matching values or drop "
                            "--num_shards/--shard_index to take the launcher's")
    with config.unlocked():
        config.num_shards, config.shard_index = shard.world_size, shard.rank
        device_note = f"device {config.device}"
        if str(config.device).strip() == "auto":
            config.device = _launcher_device(shard)
            device_note = f"device auto -> {config.device}"
    log(f"build_cache: shard {shard.rank} of {shard.world_size} from {shard.launcher}'s {shard.variables}; "
        f"{device_note}")
    return shard


def explicit_shard_keys(argv: Sequence[str]) -> set[str]:
    """The shard keys set on the command line (``--config.num_shards[=]...`` or the ``--num_shards`` shorthand)."""
    found = set()
    for arg in argv:
        for key in SHARD_KEYS:
            if any(arg == flag or arg.startswith(flag + "=") for flag in (f"--config.{key}", f"--{key}")):
                found.add(key)
    return found


# ------------------------------------------------------------------------------------------------ main loop

def build_cache(config, *, generator=None, scorer=None, encoder=None, log: Callable[[str], None] | None = None,
                quiet: bool = False) -> dict:
    """Runs the whole pipeline for `config` (a configs/gen.py ConfigDict) and returns the summary dict.

    Already-built components can be passed in (benchmarks build full-size random models in memory); the
    command line loads them from the config.
    """
    from tqdm.auto import tqdm

    from ith_common.cache import CacheEntry, CacheReader, CacheWriter, entry_key
    from audio_gen.generators import prompt_seed
    from ith_common.selection import acceptance_rates

    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    if int(config.num_candidates) < 1:
        raise UserError(f"config key 'num_candidates': expected an integer >= 1, got {config.num_candidates}")
    if int(config.batch_size) < 1:
        raise UserError(f"config key 'batch_size': expected an integer >= 1, got {config.batch_size}")
    if not 0 <= int(config.shard_index) < int(config.num_shards):
        raise UserError(f"config keys 'num_shards'/'shard_index': expected 0 <= shard_index < num_shards, "
                        f"got shard_index={config.shard_index}, num_shards={config.num_shards}")
    check_oracle_config(config)
    items, total_spans = collect_prompts(list(config.spans), config.prompt_template, int(config.max_prompts))
    if not config.cache_dir:
        raise UserError("config key 'cache_dir': expected a directory for the cache")
    # Before any model is loaded: a cache_dir that cannot be written should not cost minutes of loading first.
    cache_dir = check_output_dir(config.cache_dir, what="config key 'cache_dir':")
    num_candidates = int(config.num_candidates)
    scoring = bool(config.clap_scoring)

    if generator is None or encoder is None or (scoring and scorer is None):
        if quiet:  # only now: importing diffusers/transformers takes seconds, input errors should not wait
            quiet_libraries()
        loaded = build_components(config)
        generator, scorer, encoder = (generator or loaded[0], scorer or loaded[1], encoder or loaded[2])
    if not scoring:
        scorer = None
    oracle = oracle_coverage(config, generator, items, log) if config.oracle else None
    fingerprint = fingerprint_for(config, generator, scorer, encoder)
    key_generator = {**fingerprint["generator"], "num_candidates": num_candidates}
    key_encoder = fingerprint["encoder"]
    seeds = {item.prompt: prompt_seed(item.prompt, int(config.seed)) for item in items}
    keys = {item.prompt: entry_key(item.prompt, key_generator, seeds[item.prompt], key_encoder) for item in items}

    seconds = {"generate": 0.0, "score": 0.0, "encode": 0.0, "write": 0.0}
    # One durable commit (two fsyncs) per batch of prompts rather than per prompt; a kill loses at most the
    # batch in flight, which a rerun regenerates.
    with CacheWriter(cache_dir, fingerprint=fingerprint, num_shards=int(config.num_shards),
                     shard_index=int(config.shard_index), store_waveforms=bool(config.store_waveforms),
                     commit_every=int(config.batch_size)) as writer:
        owned = [item for item in items if writer.owns(keys[item.prompt])]
        todo = [item for item in owned if not writer.has(keys[item.prompt])]
        log(f"{len(items)} distinct prompts from {total_spans} spans; this shard: {len(owned)}, "
            f"to generate: {len(todo)}, already cached: {len(owned) - len(todo)}")
        batch_size = int(config.batch_size)
        loop_started = time.perf_counter()
        with tqdm(total=len(todo), unit="prompt", desc="imagining audio", disable=not config.progress,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                prompts = [item.prompt for item in batch]
                tick = time.perf_counter()
                clips_per_prompt = generator.generate(prompts, [seeds[p] for p in prompts], num_candidates)
                # Generators that repair non-finite samples say how many, per candidate (see generators/__init__).
                nan_samples = getattr(generator, "last_nan_samples", None)
                waveforms = [clip for clips in clips_per_prompt for clip in clips]
                tock = time.perf_counter()
                seconds["generate"] += tock - tick
                texts = [item.span_text for item in batch for _ in range(num_candidates)]
                if scorer is None:  # NaN = "not scored"; only the selection rule `first` uses such entries
                    scores = np.full(len(waveforms), np.nan, dtype=np.float32)
                else:
                    scores = scorer.score(texts, waveforms, generator.sample_rate)
                tick = time.perf_counter()
                seconds["score"] += tick - tock
                tokens, masks = encoder.encode(waveforms, generator.sample_rate)
                tock = time.perf_counter()
                seconds["encode"] += tock - tick
                for index, item in enumerate(batch):
                    rows = slice(index * num_candidates, (index + 1) * num_candidates)
                    mask = masks[rows]
                    metadata = {"span_text": item.span_text, "seed": seeds[item.prompt],
                                "occurrences": item.occurrences, "first_seen": item.first_seen}
                    if nan_samples is not None:
                        metadata["nan_samples"] = [int(count) for count in nan_samples[index]]
                    writer.add(CacheEntry(
                        key=keys[item.prompt], prompt=item.prompt, tokens=tokens[rows],
                        token_mask=None if mask.all() else mask, clap_scores=scores[rows], metadata=metadata,
                        waveforms=clips_per_prompt[index] if config.store_waveforms else None,
                        sample_rate=int(generator.sample_rate) if config.store_waveforms else None))
                writer.flush()
                seconds["write"] += time.perf_counter() - tock
                bar.update(len(batch))
        seconds["loop"] = time.perf_counter() - loop_started

        # Still inside the writer: its shard lock keeps a concurrent run of this shard from writing the same
        # report files.
        with CacheReader(cache_dir) as reader:
            owned_scores = [reader.clap_scores(keys[item.prompt]) for item in owned]
        thresholds = [float(t) for t in config.thresholds]
        rates = acceptance_rates(owned_scores, thresholds)
        all_scores = np.concatenate(owned_scores) if owned_scores else np.zeros((0,), np.float32)
        skipped = None if scoring else scoring_skipped_message(config)
        seconds["total"] = time.perf_counter() - started
        suffix = _shard_suffix(config)
        summary_path = cache_dir / f"{SUMMARY_NAME}{suffix}.json"
        histogram_path = cache_dir / f"{HISTOGRAM_NAME}{suffix}.png"
        summary = {
            "spans": total_spans, "prompts": len(items), "prompts_in_shard": len(owned),
            "num_shards": int(config.num_shards), "shard_index": int(config.shard_index),
            "generated": len(todo), "reused": len(owned) - len(todo), "num_candidates": num_candidates,
            "clap_scoring": skipped or "done",
            # Without scores every threshold rejects everything: no rates to report, only the advice.
            "acceptance": None if skipped else {str(t): rates[t] for t in thresholds},
            "clap_score": ({"mean": float(all_scores.mean()), "min": float(all_scores.min()),
                            "max": float(all_scores.max())} if all_scores.size and not skipped else None),
            "oracle": oracle,
            "seconds": seconds,
            # Generation + scoring + encoding + cache writes, without model loading: what benchmarks compare.
            "seconds_per_generated_prompt": (seconds["loop"] / len(todo)) if todo else None,
            "files": {"summary": str(summary_path), "histogram": str(histogram_path)},
            "fingerprint": fingerprint,
        }
        write_histogram(histogram_path, all_scores, thresholds, rates,
                        f"CLAP scores: {len(owned)} prompts x {num_candidates} candidates"
                        + (f" (shard {config.shard_index + 1}/{config.num_shards})" if config.num_shards > 1 else ""),
                        skipped=skipped)
        _remove_stale_temporaries(summary_path)
        atomic_write_text(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------ CLI

def quiet_libraries() -> None:
    """Model-loading chatter (weight-loading bars, deprecation notes) would drown the one progress bar."""
    import warnings

    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*weight_norm.*")


def parse_args(argv: Sequence[str]):
    from ith_common.config import apply_override, load_config

    try:
        config, rest = load_config(argv)
    except ValueError as error:  # a config file's get_config rejecting its variant (e.g. configs/gen.py:tyni)
        raise UserError(f"config: {error}") from None
    shorthand = argparse.ArgumentParser(prog="python -m audio_gen.build_cache", add_help=False)
    for key in ("num_shards", "shard_index", "spans", "cache_dir"):
        shorthand.add_argument(f"--{key}")
    known, unknown = shorthand.parse_known_args(rest)
    if unknown:
        raise UserError(f"unknown arguments: {' '.join(unknown)} (settings are --config.KEY=VALUE)")
    for key, value in vars(known).items():
        if value is not None:
            apply_override(config, key, value)
    return config


@contextlib.contextmanager
def _os_errors_name(path: str):
    """A write through a file descriptor that fails (disk full, file too large) raises an OSError without a file
    name; the run writes nowhere but the cache, so it is attributed to the cache directory."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        config = parse_args(argv)
        apply_launcher(config, explicit=explicit_shard_keys(argv))
        with _os_errors_name(config.cache_dir):
            summary = build_cache(config, quiet=True)
    except KeyboardInterrupt:
        print("interrupted; finished entries are in the cache, a rerun resumes", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
