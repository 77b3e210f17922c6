"""How many audio tokens T per clip: cache size against how much of the clip's time structure T tokens keep.

    python benchmarks/token_budget.py [--clips 200] [--json out.json]

Two measurements, both offline and weight-free (results and the choice: docs/audio_tokens.md):

1. Cache bytes per prompt for each T, measured by writing real `audio_gen.cache` entries (K = 5 candidates,
   D = 768 as AST and CLAP give, float16), and extrapolated to AuditoryBench's distinct spans.
2. What pooling to T tokens keeps of a clip's time structure: synthetic 5 s clips of the kinds the two tasks
   imagine (steady pitched tones, repeated calls such as barks or chirps, sweeps such as sirens, an event over
   ambience), 64-bin log-mel frames averaged to AST's 50 time patches of a 5 s clip (the time resolution of
   the AST tokens), pooled to T tokens exactly as `audio_gen.encoders.pool_frames` does, expanded back to 50
   steps, and scored two ways: within-clip R^2 = 1 - SSE / SST around the clip's own mean frame (how much of
   the change over time the T tokens keep; T = 1 keeps none of it by construction), and global R^2 around
   the mean frame of all clips (how much of everything that tells clips apart, the "what" as well as the
   "when", is kept).

Real encoder features (AST, CLAP) are contextualised by self-attention, so each token also carries
clip-level information; the log-mel R^2 is a conservative proxy for what the fusion layer can still locate
in time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 50)
SAMPLE_RATE = 16000
SECONDS = 5.0
AST_TIME_PATCHES = 50  # valid AST time patches of a 5 s clip (see docs/audio_tokens.md)
AUDITORYBENCH_DISTINCT_SPANS = 17549  # train + dev, whitespace-normalised (counted from the CSVs)
KINDS = ("steady tone", "repeated calls", "sweep", "event over ambience")


def synth_clip(kind: str, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    base = 110.0 * 2 ** rng.uniform(0, 4)
    harmonics = lambda f: sum(np.sin(2 * np.pi * f * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 5))
    if kind == "steady tone":
        clip = harmonics(base) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(3, 7) * t))
    elif kind == "repeated calls":
        envelope = np.zeros_like(t)
        for _ in range(rng.integers(2, 7)):
            start, length = rng.uniform(0, SECONDS - 0.3), rng.uniform(0.08, 0.4)
            envelope += np.exp(-0.5 * ((t - start - length / 2) / (length / 4)) ** 2)
        clip = envelope * (harmonics(base) + 0.3 * rng.standard_normal(t.size))
    elif kind == "sweep":
        rate = rng.uniform(0.3, 1.5)
        frequency = base * 2 ** (np.sin(2 * np.pi * rate * t))
        clip = np.sin(2 * np.pi * np.cumsum(frequency) / SAMPLE_RATE)
    else:
        onset = rng.uniform(0.5, 4.0)
        event = (t >= onset) * np.exp(-(t - onset).clip(0) * rng.uniform(1, 4)) * harmonics(base)
        clip = 0.05 * rng.standard_normal(t.size) + event
    clip = clip + 0.01 * rng.standard_normal(t.size)
    return (clip / (np.abs(clip).max() + 1e-9) * 0.5).astype(np.float32)


def patch_sequence(encoder, clip: np.ndarray):
    """Log-mel frames (100 per second) averaged to AST's time-patch rate: [AST_TIME_PATCHES, 64]."""
    import torch

    signal = torch.from_numpy(clip)
    spectrum = torch.stft(signal, n_fft=400, hop_length=160, window=encoder.window, center=False,
                          return_complex=True)
    frames = torch.log(spectrum.abs().pow(2).T @ encoder.filters + 1e-6)
    return torch.nn.functional.adaptive_avg_pool1d(frames.T.unsqueeze(0), AST_TIME_PATCHES)[0].T


def pooled_reconstruction(sequence, num_tokens: int):
    """The sequence as T pooled tokens expanded back over their segments (piecewise constant)."""
    import torch

    from audio_gen.encoders import pool_frames

    tokens, _ = pool_frames(sequence, sequence.shape[0], num_tokens)
    length = sequence.shape[0]
    # The segments adaptive_avg_pool1d averages: segment i = [floor(i L / T), ceil((i + 1) L / T)).
    rebuilt = torch.zeros_like(sequence)
    counts = torch.zeros(length, 1)
    for index in range(num_tokens):
        start, end = (index * length) // num_tokens, -(-((index + 1) * length) // num_tokens)
        rebuilt[start:end] += tokens[index]
        counts[start:end] += 1
    return rebuilt / counts


def measure_retention(clips_per_kind: int, seed: int = 0) -> dict:
    """Per kind: within-clip R^2 (time structure kept) and, over all clips, global R^2 (everything kept)."""
    import torch

    from audio_gen.encoders import LogMelEncoder

    encoder = LogMelEncoder(num_tokens=1)
    rng = np.random.default_rng(seed)
    sequences = {kind: [patch_sequence(encoder, synth_clip(kind, rng)) for _ in range(clips_per_kind)]
                 for kind in KINDS}
    everything = [s for kind in KINDS for s in sequences[kind]]
    global_mean = torch.stack(everything).mean(dim=(0, 1))
    global_total = float(sum(((s - global_mean) ** 2).sum() for s in everything))
    table = {kind: {} for kind in KINDS}
    table["global"] = {}
    for t in TOKEN_COUNTS:
        global_error = 0.0
        for kind in KINDS:
            errors, totals = [], []
            for sequence in sequences[kind]:
                error = float(((sequence - pooled_reconstruction(sequence, t)) ** 2).sum())
                errors.append(error)
                totals.append(float(((sequence - sequence.mean(dim=0)) ** 2).sum()))
                global_error += error
            table[kind][t] = float(np.mean([1.0 - e / s for e, s in zip(errors, totals)]))
        table["global"][t] = 1.0 - global_error / global_total
    return table


def measure_cache_bytes(num_entries: int = 40, dim: int = 768, candidates: int = 5) -> dict:
    from ith_common.cache import CacheEntry, CacheWriter, entry_key

    sizes = {}
    rng = np.random.default_rng(0)
    for tokens in TOKEN_COUNTS:
        with tempfile.TemporaryDirectory() as directory:
            with CacheWriter(directory, fingerprint={"budget": tokens}) as writer:
                for index in range(num_entries):
                    prompt = f"prompt {index}"
                    writer.add(CacheEntry(
                        key=entry_key(prompt, {"g": 1}, index, {"t": tokens}), prompt=prompt,
                        tokens=rng.standard_normal((candidates, tokens, dim)).astype(np.float16), token_mask=None,
                        clap_scores=rng.uniform(-1, 1, candidates).astype(np.float32), metadata={"span_text": prompt}))
            total = sum(p.stat().st_size for p in pathlib.Path(directory).rglob("*") if p.is_file())
        sizes[tokens] = total / num_entries
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=50, help="synthetic clips per kind")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sizes = measure_cache_bytes()
    retention = measure_retention(args.clips)
    header = ("| T | bytes/prompt (K=5, D=768) | AuditoryBench cache | "
              + " | ".join(f"{k}: within-clip R^2" for k in KINDS) + " | all clips: global R^2 |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for t in TOKEN_COUNTS:
        row = [f"{t}", f"{sizes[t] / 1024:.0f} KiB", f"{sizes[t] * AUDITORYBENCH_DISTINCT_SPANS / 2 ** 30:.2f} GiB"]
        row += [f"{retention[k][t]:.3f}" for k in KINDS] + [f"{retention['global'][t]:.3f}"]
        print("| " + " | ".join(row) + " |")
    print(f"({args.clips} clips per kind, {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"bytes_per_prompt": sizes, "r2": retention}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
