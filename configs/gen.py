r"""Imagined-audio generation for `python -m audio_gen.build_cache` (the torch sidecar).

Variants (comma-separated, any order):

- (none) / ``paper``: ITH's setting.  Stable Audio Open 1.0, K = 5 candidates per prompt, 50 steps, 5 s clips,
  prompt "{span} sound", negative prompt "Low quality", CLAP laion/clap-htsat-fused, AST tokens; fp16 on GPU.
- ``tiny``: tiny random-init checkpoints (Stable Audio DiT + Oobleck VAE + T5, CLAP, AST) built on first use
  into $ITH_JAX_CACHE/tiny (default ~/.cache/ith_jax/tiny), 4 steps, 1 s clips: runs offline, in seconds, on
  a CPU.  For tests and smoke runs; the audio is noise.
- ``tone``: the weight-free sine-tone generator instead of Stable Audio (offline demo, oracle experiment).
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

PAPER_THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8)
_VARIANT_PARTS = ("paper", "tiny", "tone", "short", "unfused")


def get_config(arg=None):
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    for part in parts:
        if part not in _VARIANT_PARTS:
            raise ValueError(f"unknown configs/gen.py variant {part!r}; known: {', '.join(_VARIANT_PARTS)}")
    tiny = "tiny" in parts

    c = ml_collections.ConfigDict()
    # ---- input and output
    c.spans = ()  # manifest (.jsonl) and/or span-list (.txt) paths; required
    c.cache_dir = "workdirs/audio_cache"
    c.prompt_template = "{span} sound"  # ITH's prompt; {span} is the span text
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
    c.tone_frequencies = ""  # JSON {"<prompt>": hertz} for the tone generator ("" = hashed pitches)

    # ---- scoring and selection
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

    if "tone" in parts:
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
    return c
