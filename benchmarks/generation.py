"""Seconds per prompt (K clips) of build_cache's generation against ITH's loop, on the full-size architecture.

    python benchmarks/generation.py --device cuda [--prompts 16 --batch-size 8] [--out gen.json]
    python benchmarks/generation.py --tiny        # tiny checkpoints on a CPU: checks the script runs

One script, one run, three measurements on the same models (random weights; only the shapes matter for
speed):

1. ITH's loop: one ``StableAudioPipeline`` call per prompt with ``num_waveforms_per_prompt=K``, the stock
   pipeline (always 1024 latent frames), then CLAP scores and AST tokens of its K clips, one prompt at a time.
2. build_cache, paper-exact mode (``latent_mode=full``): `audio_gen.build_cache.build_cache` end to end (batched
   generation, CLAP scoring, AST encoding, durable cache writes) with ``--batch-size`` prompts per call.
3. build_cache, short-latent mode (``latent_mode=short``): the same, denoising only the frames 5 s need.

The models are built with the architecture values of the real checkpoints (Stable Audio Open 1.0's DiT, Oobleck
VAE, T5-base encoder and projection; CLAP HTSAT-fused with its RoBERTa text tower; AST AudioSet), straight on
the device, in float16 (generator, AST) and float32 (CLAP), as build_cache runs them.  Tokenizers are small
ones trained in-process (their ids fit the real vocabularies; token count per prompt is what matters).
Goals (end to end): >= 1.5x faster than ITH's loop in paper-exact mode, >= 10x in short-latent mode.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ith_common.atomic import atomic_write_text, check_output_file  # noqa: E402
from ith_common.errors import UserError, run_main  # noqa: E402
from ith_common.prompts import build_prompt  # noqa: E402

# Architecture values of the real checkpoints (see /work/shared/model_configs and docs/audio_tokens.md).
STABLE_AUDIO_TRANSFORMER = dict(sample_size=1024, in_channels=64, num_layers=24, attention_head_dim=64,
                                num_attention_heads=24, num_key_value_attention_heads=12, out_channels=64,
                                cross_attention_dim=768, time_proj_dim=256, global_states_input_dim=1536,
                                cross_attention_input_dim=768)
STABLE_AUDIO_VAE = dict(encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 8, 8],
                        channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128, decoder_input_channels=64,
                        audio_channels=2, sampling_rate=44100)
STABLE_AUDIO_PROJECTION = dict(text_encoder_dim=768, conditioning_dim=768, min_value=0, max_value=512)
STABLE_AUDIO_SCHEDULER = dict(sigma_min=0.3, sigma_max=500, sigma_data=1.0, sigma_schedule="exponential",
                              num_train_timesteps=1000, solver_order=2, prediction_type="v_prediction", rho=7.0,
                              solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                              final_sigmas_type="zero")
T5_BASE_ENCODER = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       feed_forward_proj="relu", dropout_rate=0.1, pad_token_id=0, eos_token_id=1)
CLAP_AUDIO = dict(depths=[2, 2, 6, 2], num_attention_heads=[4, 8, 16, 32], window_size=8, patch_size=4,
                  patch_stride=[4, 4], patch_embeds_hidden_size=96, spec_size=256, num_mel_bins=64,
                  hidden_size=768, enable_fusion=True, projection_dim=512)
CLAP_TEXT = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                 bos_token_id=0, eos_token_id=2, projection_dim=512)
CLAP_FEATURES = dict(feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=10, fft_window_size=1024,
                     frequency_min=50, frequency_max=14000, truncation="fusion", padding="repeatpad")

SPANS = ["dog barking", "sound of a tube train", "a cat meowing", "roadside ambience", "squeal of a piglet",
         "a violin playing a high note", "thunder rumbling", "a rooster crowing", "rain on a tin roof",
         "a tuba playing a low note", "an owl hooting", "men talking in a locker room", "a steam whistle",
         "a horse neighing", "a bee buzzing", "a church bell", "a mouse squeaking", "a lion roaring",
         "a kettle whistling", "waves crashing", "a frog croaking", "a car horn", "a duck quacking",
         "footsteps on gravel", "a baby crying", "a drum roll", "a wolf howling", "glass breaking",
         "a siren wailing", "a crow cawing", "a sheep bleating", "an elephant trumpeting"]


def build_full_size(device: str, generator_dtype, seed: int = 0):
    """Random-weight models with the real architectures, built straight on `device`."""
    import torch
    from diffusers import (AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioDiTModel,
                           StableAudioPipeline)
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
    from transformers import (ASTConfig, ASTFeatureExtractor, ASTModel, ClapConfig, ClapFeatureExtractor, ClapModel,
                              ClapProcessor, T5Config, T5EncoderModel)

    from audio_gen import tiny

    torch.manual_seed(seed)
    t5_tokenizer = tiny.train_t5_tokenizer()
    t5_tokenizer.model_max_length = 128  # the real tokenizer's: 128 text tokens + 2 timing tokens per prompt
    with torch.device(device):
        pipeline = StableAudioPipeline(
            vae=AutoencoderOobleck(**STABLE_AUDIO_VAE),
            text_encoder=T5EncoderModel(T5Config(**T5_BASE_ENCODER)),
            projection_model=StableAudioProjectionModel(**STABLE_AUDIO_PROJECTION),
            tokenizer=t5_tokenizer,
            transformer=StableAudioDiTModel(**STABLE_AUDIO_TRANSFORMER),
            scheduler=CosineDPMSolverMultistepScheduler(**STABLE_AUDIO_SCHEDULER))
        clap = ClapModel(ClapConfig(text_config=CLAP_TEXT, audio_config=CLAP_AUDIO, projection_dim=512))
        ast = ASTModel(ASTConfig())
    pipeline.to(device, generator_dtype)
    clap_processor = ClapProcessor(feature_extractor=ClapFeatureExtractor(**CLAP_FEATURES),
                                   tokenizer=tiny.train_roberta_tokenizer())
    return pipeline, clap.eval(), clap_processor, ast.to(generator_dtype).eval(), ASTFeatureExtractor()


def load_tiny(device: str):
    """The tiny checkpoints through the normal loaders (the --tiny smoke run)."""
    from audio_gen.clap import load_clap
    from audio_gen.generators.stable_audio import StableAudioGenerator
    from audio_gen.pretrained import resolve_source
    from transformers import ASTFeatureExtractor, ASTModel

    pipeline = StableAudioGenerator.load("tiny:stable_audio", device=device, audio_seconds=1.0).pipeline
    clap, processor, _ = load_clap("tiny:clap_fused", device, "float32")
    ast_dir = resolve_source("tiny:ast", "AST")
    return pipeline, clap, processor, ASTModel.from_pretrained(ast_dir).to(device), \
        ASTFeatureExtractor.from_pretrained(ast_dir)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ith_loop(pipeline, items, scorer, encoder, args) -> dict:
    """ITH's generation loop: the stock pipeline, one prompt per call, then scoring and encoding its clips."""
    import torch

    generate = score_encode = 0.0
    for index, (prompt, span) in enumerate(items):
        synchronize(args.device)
        tick = time.perf_counter()
        audio = pipeline(prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                         audio_end_in_s=args.seconds, num_waveforms_per_prompt=args.candidates,
                         generator=torch.Generator(args.device).manual_seed(index)).audios
        clips = np.nan_to_num(audio.float().mean(dim=1).cpu().numpy())
        synchronize(args.device)
        tock = time.perf_counter()
        scorer.score([span] * len(clips), list(clips), pipeline.vae.config.sampling_rate)
        encoder.encode(list(clips), pipeline.vae.config.sampling_rate)
        synchronize(args.device)
        generate += tock - tick
        score_encode += time.perf_counter() - tock
    count = len(items)
    return {"generate_s_per_prompt": generate / count, "end_to_end_s_per_prompt": (generate + score_encode) / count}


def ours(pipeline, items, scorer, encoder, args, latent_mode: str, workdir: pathlib.Path,
         compile_transformer: bool = False) -> dict:
    import torch
    from ml_collections import ConfigDict

    from audio_gen.build_cache import build_cache
    from audio_gen.generators.stable_audio import StableAudioGenerator

    spans_file = workdir / "spans.txt"
    spans_file.write_text("\n".join(span for _, span in items) + "\n", encoding="utf-8")
    config = ConfigDict(_load_gen_config(args.tiny).to_dict())
    config.update(spans=(str(spans_file),), cache_dir=str(workdir / f"cache_{latent_mode}"),
                  num_candidates=args.candidates, num_inference_steps=args.steps, audio_seconds=args.seconds,
                  batch_size=args.batch_size, latent_mode=latent_mode, progress=False, device=args.device,
                  negative_prompt=args.negative_prompt, num_tokens=16)
    generator = StableAudioGenerator(pipeline, identity={"id": "random-weights"}, num_inference_steps=args.steps,
                                     negative_prompt=args.negative_prompt, audio_seconds=args.seconds,
                                     latent_mode=latent_mode, decode_batch_size=args.vae_decode_batch_size,
                                     compile_transformer=compile_transformer, warn_on_nan=False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    summary = build_cache(config, generator=generator, scorer=scorer, encoder=encoder, log=lambda message: None)
    count = summary["generated"]
    result = {"latent_frames": generator.latent_frames,
              "generate_s_per_prompt": summary["seconds"]["generate"] / count,
              "end_to_end_s_per_prompt": summary["seconds_per_generated_prompt"],
              "score_s_per_prompt": summary["seconds"]["score"] / count,
              "encode_s_per_prompt": summary["seconds"]["encode"] / count,
              "write_s_per_prompt": summary["seconds"]["write"] / count}
    if args.device.startswith("cuda"):
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return result


def _load_gen_config(tiny: bool):
    from ith_common.config import load_config_file

    repo = pathlib.Path(__file__).resolve().parents[1]
    return load_config_file(f"{repo / 'configs' / 'gen.py'}:{'tiny' if tiny else 'paper'}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints on the CPU: a check that it runs")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--vae-decode-batch-size", type=int, default=8)
    parser.add_argument("--negative-prompt", default="Low quality")
    parser.add_argument("--skip-ith", action="store_true", help="skip ITH's loop (to save device time)")
    parser.add_argument("--compile", action="store_true",
                        help="also time both modes with the DiT under torch.compile (after the plain runs)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device, args.steps, args.seconds = "cpu", min(args.steps, 3), min(args.seconds, 1.0)
        args.prompts, args.batch_size = min(args.prompts, 4), min(args.batch_size, 2)
    if args.prompts + args.batch_size > len(SPANS):
        parser.error(f"--prompts + --batch-size: at most {len(SPANS)} (timed and warm-up prompts are distinct)")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.out:
        check_output_file(args.out, what="--out")  # before minutes of model building
    import torch
    import diffusers
    import transformers

    from audio_gen.build_cache import quiet_libraries
    from audio_gen.clap import ClapScorer
    from audio_gen.encoders import AstEncoder

    quiet_libraries()
    import warnings

    # torchsde's remarks about the scheduler's final sigma, once per call of the stock pipeline.
    warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available (use --tiny for a CPU check)")
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    if args.tiny:
        pipeline, clap, clap_processor, ast, ast_extractor = load_tiny(args.device)
    else:
        pipeline, clap, clap_processor, ast, ast_extractor = build_full_size(args.device, dtype)
    pipeline.set_progress_bar_config(disable=True)
    scorer = ClapScorer.from_loaded(clap, clap_processor, identity={"id": "random-weights"})
    encoder = AstEncoder.from_loaded(ast_extractor, ast, identity={"id": "random-weights"}, num_tokens=16)
    build_seconds = time.perf_counter() - started
    items = [(build_prompt(span), span) for span in SPANS[:args.prompts]]
    # Warm-up prompts are other spans, as many as one batch, so that every timed batch shape was seen before
    # (kernel selection, allocator; with --compile, compilation).
    warmup = [(build_prompt(span), span) for span in SPANS[-args.batch_size:]]

    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
               or platform.machine(),
               "torch": torch.__version__, "diffusers": diffusers.__version__,
               "transformers": transformers.__version__, "prompts": len(items), "batch_size": args.batch_size,
               "candidates": args.candidates, "steps": args.steps, "seconds": args.seconds,
               "generator_dtype": str(dtype).replace("torch.", ""), "model_build_s": build_seconds,
               "tiny": args.tiny}
    warm_args = argparse.Namespace(**{**vars(args), "steps": 2})
    with tempfile.TemporaryDirectory(prefix="ith_generation_bench_") as directory:
        workdir = pathlib.Path(directory)
        variants = [("ours_full", "full", False), ("ours_short", "short", False)]
        if args.compile:
            variants += [("ours_full_compiled", "full", True), ("ours_short_compiled", "short", True)]
        if not args.skip_ith:
            ith_loop(pipeline, warmup[:1], scorer, encoder, warm_args)
            results["ith_loop"] = ith_loop(pipeline, items, scorer, encoder, args)
        for name, mode, compiled in variants:
            (workdir / f"warmup_{name}").mkdir()
            ours(pipeline, warmup, scorer, encoder, warm_args, mode, workdir / f"warmup_{name}", compiled)
            (workdir / name).mkdir()
            results[name] = ours(pipeline, items, scorer, encoder, args, mode, workdir / name, compiled)
    results["total_s"] = time.perf_counter() - started

    full_frames = int(pipeline.transformer.config.sample_size)
    rows = [(f"ITH loop (1 prompt/call, stock pipeline: {full_frames} frames)", results.get("ith_loop"))]
    for name, mode, compiled in variants:
        rows.append((f"build_cache {mode} ({args.batch_size} prompts/call, {results[name]['latent_frames']} "
                     f"frames{', torch.compile' if compiled else ''})", results[name]))
    baseline = results.get("ith_loop", {}).get("end_to_end_s_per_prompt")
    print(f"device: {results['device']}; {len(items)} prompts x K={args.candidates}, {args.steps} steps, "
          f"{args.seconds} s clips, generator {results['generator_dtype']}")
    print("| pipeline | generation s/prompt | end-to-end s/prompt | speedup (end to end) |")
    print("|---|---|---|---|")
    for name, row in rows:
        if row is None:
            continue
        speedup = f"{baseline / row['end_to_end_s_per_prompt']:.2f}x" if baseline else "-"
        print(f"| {name} | {row['generate_s_per_prompt']:.3f} | {row['end_to_end_s_per_prompt']:.3f} | {speedup} |")
    if baseline and not args.tiny:
        for key, goal in (("ours_full", 1.5), ("ours_short", 10.0)):
            achieved = baseline / results[key]["end_to_end_s_per_prompt"]
            print(f"goal {key}: >= {goal}x, got {achieved:.2f}x: {'met' if achieved >= goal else 'NOT met'}")
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
