r"""Does the short-latent mode cost quality?  CLAP scores of the same prompts and seeds in both latent modes.

    python scripts/compare_latent_modes.py --spans gold_dev.jsonl --max-prompts 200 --device cuda \
        --generator-model /models/stable-audio-open-1.0 --clap-model /models/clap-htsat-fused --out cmp.json

diffusers' StableAudioPipeline always denoises the model's full latent window (1024 frames = 47.55 s) and trims
the decoded audio; `latent_mode="short"` denoises only the frames the requested duration needs (109 for 5 s),
about 9x less work.  Stable Audio Open was trained on windows padded to its full length, so whether it keeps
its quality on a short window is an empirical question; this script answers it on real weights:

- every prompt is generated K times in each mode with the same per-candidate seeds (the short mode's initial
  noise is a prefix-length draw from the same generator, so the two are paired, not identical);
- every candidate is scored against its span text with CLAP, as build_cache does;
- the report gives, per mode, the mean CLAP score of all candidates, the mean best-of-K score, the acceptance
  rate at each threshold, the seconds per prompt, and the paired difference short - full of the per-prompt
  mean and best-of-K scores with a bootstrap 95 % interval over prompts;
- verdict: the short mode is "not worse" when the interval's lower end of the best-of-K difference is above
  -margin (default 0.02 in cosine), "worse" when its upper end is below -margin, else "inconclusive".

``--save-audio DIR`` also writes every clip as WAV for listening.  ``--tiny`` runs the same code on the tiny
random-init checkpoints on a CPU (a smoke test of the script; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ith_common.atomic import atomic_write_text, check_output_file  # noqa: E402
from ith_common.errors import UserError, run_main  # noqa: E402
from ith_common.prompts import DEFAULT_PROMPT_TEMPLATE  # noqa: E402

THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8)


def bootstrap_interval(differences: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    if differences.size == 0:
        return float("nan"), float("nan")
    means = rng.choice(differences, size=(rounds, differences.size), replace=True).mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def verdict(interval: tuple[float, float], margin: float) -> str:
    low, high = interval
    if low > -margin:
        return "not worse"
    if high < -margin:
        return "worse"
    return "inconclusive"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", nargs="+", help="span manifests (.jsonl) and/or span lists (.txt)")
    parser.add_argument("--max-prompts", type=int, default=100)
    parser.add_argument("--generator-model", default="stabilityai/stable-audio-open-1.0")
    parser.add_argument("--clap-model", default="laion/clap-htsat-fused")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    parser.add_argument("--negative-prompt", default="Low quality")
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--margin", type=float, default=0.02, help="cosine difference deemed negligible")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--save-audio", default=None, help="write every clip as WAV into this directory")
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoints on a CPU (smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.generator_model, args.clap_model = "tiny:stable_audio", "tiny:clap_fused"
        args.steps, args.seconds, args.device = min(args.steps, 4), min(args.seconds, 1.0), "cpu"
    if not args.spans:
        parser.error("--spans is required")
    return args


def run(args) -> dict:
    from tqdm.auto import tqdm

    from audio_gen.build_cache import quiet_libraries, collect_prompts
    from audio_gen.clap import ClapScorer
    from audio_gen.generators import prompt_seed
    from audio_gen.generators.stable_audio import StableAudioGenerator
    from ith_common.selection import acceptance_rates

    items, _ = collect_prompts(args.spans, args.prompt_template, args.max_prompts)
    if not items:
        raise UserError("no spans found in " + ", ".join(args.spans))
    quiet_libraries()
    full = StableAudioGenerator.load(args.generator_model, device=args.device, dtype=args.dtype,
                                     num_inference_steps=args.steps, negative_prompt=args.negative_prompt,
                                     audio_seconds=args.seconds, latent_mode="full")
    short = StableAudioGenerator(full.pipeline, identity={}, num_inference_steps=args.steps,
                                 negative_prompt=args.negative_prompt, audio_seconds=args.seconds,
                                 latent_mode="short", warn_on_nan=full.warn_on_nan)
    scorer = ClapScorer(args.clap_model, device=str(full.device))
    save_dir = pathlib.Path(args.save_audio) if args.save_audio else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)

    results = {}
    for mode, generator in (("full", full), ("short", short)):
        scores, seconds = [], 0.0
        with tqdm(total=len(items), unit="prompt", desc=f"{mode} latent ({generator.latent_frames} frames)") as bar:
            for start in range(0, len(items), args.batch_size):
                batch = items[start:start + args.batch_size]
                prompts = [item.prompt for item in batch]
                tick = time.perf_counter()
                clips = generator.generate(prompts, [prompt_seed(p, args.seed) for p in prompts], args.candidates)
                seconds += time.perf_counter() - tick
                for item, prompt_clips in zip(batch, clips):
                    scores.append(scorer.score([item.span_text] * len(prompt_clips), list(prompt_clips),
                                               generator.sample_rate))
                    if save_dir:
                        _save_clips(save_dir, mode, item, prompt_clips, generator.sample_rate)
                bar.update(len(batch))
        results[mode] = {"latent_frames": generator.latent_frames, "scores": np.stack(scores),
                         "seconds_per_prompt": seconds / len(items)}

    report = {"prompts": len(items), "candidates": args.candidates, "steps": args.steps, "seconds": args.seconds,
              "generator_model": args.generator_model, "clap_model": args.clap_model, "modes": {}}
    for mode, result in results.items():
        scores = result["scores"]
        report["modes"][mode] = {
            "latent_frames": result["latent_frames"],
            "mean_clap": float(scores.mean()),
            "mean_best_of_k": float(scores.max(axis=1).mean()),
            "acceptance": {str(t): r for t, r in acceptance_rates(list(scores), THRESHOLDS).items()},
            "seconds_per_prompt": result["seconds_per_prompt"],
        }
    mean_difference = results["short"]["scores"].mean(axis=1) - results["full"]["scores"].mean(axis=1)
    best_difference = results["short"]["scores"].max(axis=1) - results["full"]["scores"].max(axis=1)
    report["short_minus_full"] = {
        "mean_clap": {"mean": float(mean_difference.mean()), "ci95": bootstrap_interval(mean_difference)},
        "best_of_k": {"mean": float(best_difference.mean()), "ci95": bootstrap_interval(best_difference)},
    }
    report["margin"] = args.margin
    report["verdict"] = verdict(tuple(report["short_minus_full"]["best_of_k"]["ci95"]), args.margin)
    report["speedup"] = results["full"]["seconds_per_prompt"] / max(results["short"]["seconds_per_prompt"], 1e-9)
    return report


def _save_clips(directory: pathlib.Path, mode: str, item, clips: np.ndarray, sample_rate: int) -> None:
    import soundfile

    safe = "".join(c if c.isalnum() else "_" for c in item.span_text)[:60]
    for index, clip in enumerate(clips):
        soundfile.write(directory / f"{safe}.{mode}.{index}.wav", np.clip(clip, -1, 1), sample_rate)


def format_report(report: dict) -> str:
    lines = ["| mode | latent frames | mean CLAP | mean best-of-K | "
             + " | ".join(f"accept@{t}" for t in THRESHOLDS) + " | s/prompt (generation) |",
             "|---|---|---|---|" + "---|" * len(THRESHOLDS) + "---|"]
    for mode, row in report["modes"].items():
        lines.append(f"| {mode} | {row['latent_frames']} | {row['mean_clap']:.4f} | {row['mean_best_of_k']:.4f} | "
                     + " | ".join(f"{row['acceptance'][str(t)]:.1%}" for t in THRESHOLDS)
                     + f" | {row['seconds_per_prompt']:.3f} |")
    best = report["short_minus_full"]["best_of_k"]
    lines.append(f"short - full, best-of-K: {best['mean']:+.4f} (95% CI {best['ci95'][0]:+.4f} .. "
                 f"{best['ci95'][1]:+.4f}) over {report['prompts']} prompts; margin {report['margin']}: "
                 f"{report['verdict']}; speedup {report['speedup']:.1f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.out:
        check_output_file(args.out, what="--out")  # before generating for minutes
    report = run(args)
    print(format_report(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
