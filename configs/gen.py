r"""Imagined-audio generation for `python -m audio_gen.build_cache` (the torch sidecar).

Variants (comma-separated, any order):

- (none) / ``paper``: ITH's setting.  Stable Audio Open 1.0, K = 5 candidates per prompt, 50 steps, 5 s clips,
  prompt "{span} sound", negative prompt "Low quality", CLAP laion/clap-htsat-fused, AST tokens; fp16 on GPU.
- ``tiny``: tiny random-init checkpoints (Stable Audio DiT + Oobleck VAE + T5, CLAP, AST) built on first use
  into $ITH_JAX_CACHE/tiny (default ~/.cache/ith_jax/tiny), 4 steps, 1 s clips: runs offline, in seconds, on
  a CPU.  For tests and smoke runs; the audio is noise.
- ``tone``: the weight-free sine-tone generator instead of Stable Audio (offline demo); prompts get hashed pitches.
- ``oracle``: the ORACLE-audio experiment, a ceiling for the fusion mechanism and never a result about imagined
  audio.  Each prompt becomes a sine tone whose pitch comes from ``tone_frequencies``, a table fitted to the
  *labelled* pitch comparisons by ``python -m audio_gen.pitch_table`` (so the tones carry the answers), encoded
  as ``logmel`` tokens; one candidate per prompt.  CLAP scoring is skipped (``clap_scoring = False``: CLAP has
  nothing to say about a synthetic tone, and ITH's threshold would reject every clip), the cache stores NaN
  scores, and training must use ``audio.selection=first``.  CPU only: pitch train + dev (15,264 prompts) took
  under 2 minutes on 2 shared cores.  Combines with ``tiny`` (1 s clips, T = 4).  ``tone_frequencies`` is
  required (the gold manifests come from ``python -m ith_jax.detect --gold``):

      python -m audio_gen.pitch_table --data pitch/train.csv pitch/dev.csv --out oracle_pitch.json
      python -m audio_gen.build_cache --config configs/gen.py:oracle --config.tone_frequencies=oracle_pitch.json \
          --config.spans=gold_train.jsonl,gold_dev.jsonl --config.cache_dir=workdirs/cache_oracle
- ``short``: denoise only the latent frames the clip needs (see audio_gen/generators/stable_audio.py).
- ``unfused``: CLAP laion/clap-htsat-unfused (with ``tiny``: its tiny counterpart).

    python -m audio_gen.build_cache --config configs/gen.py --config.spans=gold_dev.jsonl \
        --config.cache_dir=workdirs/cache_ast
    python -m audio_gen.build_cache --config configs/gen.py:tiny --config.spans=spans.jsonl \
        --config.cache_dir=/tmp/cache --num_shards 2 --shard_index 0

`spans` takes span manifests (``*.jsonl``, docs/manifest.md) and/or plain lists (``*.txt``: one span text per
line, ``#`` comments).  Model keys take a local directory, a Hugging Face hub id or ``tiny:<name>``.
"""

import ml_collections

from ith_common.config import parse_variants
from ith_common.prompts import DEFAULT_PROMPT_TEMPLATE
from ith_common.selection import DEFAULT_THRESHOLDS as PAPER_THRESHOLDS

VARIANT_GROUPS = {"size": ("paper", "tiny"), "generator": ("tone", "oracle"), "latent": ("short",),
                  "clap": ("unfused",)}


def get_config(arg=None):
    variant = parse_variants(arg, VARIANT_GROUPS, config="configs/gen.py")
    parts = set(v for v in variant.values() if v)
    tiny = "tiny" in parts

    c = ml_collections.ConfigDict()
    # ---- input and output
    c.spans = ()  # manifest (.jsonl) and/or span-list (.txt) paths; required
    c.cache_dir = "workdirs/audio_cache"
    c.prompt_template = DEFAULT_PROMPT_TEMPLATE  # ITH's "{span} sound"; {span} is the span text
    c.max_prompts = 0  # 0 = all; >0 keeps the first N distinct prompts (smoke runs)
    c.store_waveforms = False  # True: also keep every candidate as FLAC in the cache (about 0.3 MB per 5 s clip)

    # ---- generation
    c.generator = "stable_audio"  # stable_audio | tone
    c.generator_model = "stabilityai/stable-audio-open-1.0"
    c.num_candidates = 5  # K
    c.num_inference_steps = 50
    c.guidance_scale = 7.0  # diffusers' default; ITH did not change it
    c.negative_prompt = "Low quality"
    c.audio_seconds = 5.0
    c.latent_mode = "full"  # full (diffusers' 1024 frames, paper-exact) | short (only the frames 5 s need)
    c.short_latent_margin_frames = 1
    c.seed = 0  # base seed; each prompt's seed is a hash of (seed, prompt)
    # The sampler's per-step noise: "gaussian" (independent normals per candidate, the same distribution as
    # diffusers' Brownian tree for one pass, without its cost) | "brownian" (diffusers' tree, one per candidate)
    c.step_noise = "gaussian"
    c.batch_size = 8  # prompts per pipeline call (x K clips)
    c.vae_decode_batch_size = 8  # clips per VAE decode call
    # Decode only the latent frames the clip needs + this margin (> the decoder's ~10-frame receptive field,
    # so the trimmed audio is the same to float rounding); -1 decodes the whole latent like diffusers.
    c.vae_decode_margin_frames = 16
    c.tone_sample_rate = 16000
    # JSON {"<prompt>": hertz} or an audio_gen.pitch_table table for the tone generator ("" = hashed pitches)
    c.tone_frequencies = ""
    c.oracle = False  # the oracle variant: tone + tone_frequencies required + logmel + no CLAP; reports say ORACLE

    # ---- scoring and selection
    # False: CLAP is neither loaded nor run, every score is stored as NaN ("not scored"), and only the selection
    # rule `first` gives audio at training time (ith_common/selection.py).
    c.clap_scoring = True
    c.clap_model = "laion/clap-htsat-fused"
    c.clap_batch_size = 16
    c.clap_dtype = "float32"
    c.thresholds = PAPER_THRESHOLDS  # reported in the summary; the rule is chosen at training time

    # ---- audio tokens
    c.encoder = "ast"  # ast | clap | logmel
    # "" = the encoder's default checkpoint (ast: MIT/ast-finetuned-audioset-10-10-0.4593; clap: clap_model);
    # "tiny:" = the tiny checkpoint of whichever encoder is chosen.
    c.encoder_model = ""
    c.num_tokens = 16  # T tokens per clip; docs/audio_tokens.md has the measurement behind 16
    c.encoder_batch_size = 16
    c.encoder_dtype = "auto"

    # ---- execution
    c.device = "auto"  # auto | cpu | cuda | cuda:N
    c.dtype = "auto"  # generator dtype: auto = float16 on GPU, float32 on CPU | float32 | float16 | bfloat16
    c.compile_transformer = False  # torch.compile the DiT: same outputs, faster on a GPU after a compile step
    c.num_shards = 1
    c.shard_index = 0
    c.progress = True

    if "tone" in parts or "oracle" in parts:
        c.generator = "tone"
        c.generator_model = ""
    if "short" in parts:
        c.latent_mode = "short"
    if "unfused" in parts:
        c.clap_model = "laion/clap-htsat-unfused"
    if tiny:
        if c.generator == "stable_audio":
            c.generator_model = "tiny:stable_audio"
        c.clap_model = "tiny:clap_unfused" if "unfused" in parts else "tiny:clap_fused"
        c.encoder_model = "tiny:"
        c.num_inference_steps = 4
        c.audio_seconds = 1.0
        c.num_tokens = 4
        c.batch_size = 4
        c.device = "cpu"
    if "oracle" in parts:
        c.oracle = True
        c.encoder = "logmel"
        c.clap_scoring = False
        # Nothing to choose between without scores: `first` reads candidate 0 only.
        c.num_candidates = 1
        # Tones and log-mel tokens are cheap per clip: larger batches mean fewer calls and cache commits.
        c.batch_size = 64
    return c
