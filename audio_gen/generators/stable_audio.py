"""Stable Audio Open through diffusers' `StableAudioPipeline`, batched over prompts, seeded per prompt.

Differences from ITH's generation loop (one ``pipe(prompt, num_waveforms_per_prompt=5)`` call per prompt),
none of which changes the distribution a prompt's clips are drawn from:

- Several prompts per pipeline call (``batch_size`` prompts x K candidates in one denoising batch).
- Per-candidate seeds (`candidate_seed`): the initial noise and the sampler's step noise of candidate k of a
  prompt come from that candidate's own seeds, so the audio does not depend on the other prompts in the call
  or their order (up to float rounding of batched kernels).
- The step noise of the SDE sampler is drawn as independent standard normals per candidate and step
  (`CandidateStepNoise`), which is what diffusers' torchsde Brownian tree yields for one solver pass, without
  the tree's per-query cost; ``step_noise="brownian"`` keeps diffusers' trees (one per candidate).
- The VAE decodes in chunks of ``decode_batch_size`` clips, and only the latent frames the clip needs plus a
  margin of 16 (``decode_margin_frames``, more than the decoder's receptive field of about 10 frames): the
  same audio as decoding all 1024 frames and trimming, to float rounding, for an eighth of the VAE's work.
- ``latent_mode="short"``: diffusers always denoises ``transformer.config.sample_size`` latent frames (1024 =
  47.55 s for Stable Audio Open) and trims the decoded audio to ``audio_end_in_s`` afterwards, so a 5 s clip
  costs as much as a 47 s one.  The short mode hands the pipeline an initial latent of only the frames the
  requested duration needs (ceil(seconds * rate / hop) + a margin; 108 + 1 = 109 frames for 5 s), so the DiT
  and the VAE only see those.  The model is still conditioned on the same start/total seconds.  It is off by
  default until `scripts/compare_latent_modes.py` has shown on real weights that CLAP scores do not drop.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import CosineDPMSolverMultistepScheduler, StableAudioPipeline

from audio_gen.generators import candidate_seed, derived_seed
from audio_gen.pretrained import (DIFFUSERS_PIPELINE_FILES, TINY_PREFIX, checkpoint_identity, load_component,
                                  resolve_source, torch_device_and_dtype)
from ith_common.errors import UserError

LATENT_MODES = ("full", "short")
STEP_NOISE = ("gaussian", "brownian")


class CandidateStepNoise:
    """The scheduler's per-step SDE noise: a standard normal draw per candidate from its own generator.

    CosineDPMSolverMultistepScheduler asks its noise sampler for (W(sigma_next) - W(sigma)) / sqrt(|dsigma|) of
    a Brownian motion W, once per step over disjoint, decreasing intervals.  Those increments are independent
    standard normals, which is what this returns, without torchsde's Brownian tree: diffusers builds one tree
    per generator, and a tree walks tens of levels of Python per query (seconds per step on a CPU), a cost
    paid K times per prompt with per-candidate seeds.  Same distribution, other draws.
    """

    def __init__(self, seeds, shape, device, dtype):
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        self.shape, self.device, self.dtype = tuple(shape), device, dtype
        self.calls = 0

    def __call__(self, sigma, sigma_next):
        self.calls += 1
        noise = [torch.randn(self.shape, generator=g, device=self.device, dtype=torch.float32)
                 for g in self.generators]
        return torch.stack(noise).to(self.dtype)


class CandidateNoiseCosineScheduler(CosineDPMSolverMultistepScheduler):
    """The stock scheduler, except that `set_timesteps` installs the `CandidateStepNoise` of the coming call
    (the stock one resets the sampler to None and builds a Brownian tree at the first step)."""

    next_step_noise = None

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.noise_sampler = self.next_step_noise


class StableAudioGenerator:
    """K candidate clips per prompt from a StableAudioPipeline checkpoint (directory, hub id or tiny:stable_audio)."""

    name = "stable_audio"

    def __init__(self, pipeline, *, identity: dict, num_inference_steps: int = 50, guidance_scale: float = 7.0,
                 negative_prompt: str = "Low quality", audio_seconds: float = 5.0, latent_mode: str = "full",
                 short_latent_margin_frames: int = 1, decode_batch_size: int = 8, decode_margin_frames: int = 16,
                 compile_transformer: bool = False, step_noise: str = "gaussian", warn_on_nan: bool = True):
        """Wraps an already-loaded `StableAudioPipeline` (use `load` to load one from a checkpoint).

        ``compile_transformer`` runs the DiT through ``torch.compile`` (in place): the same outputs to float
        rounding, faster on a GPU once compiled (compilation takes a minute or two, once per batch shape).
        ``step_noise``: "gaussian" (`CandidateStepNoise`) or "brownian" (diffusers' Brownian trees, one per
        candidate); schedulers other than CosineDPMSolverMultistepScheduler always keep their own noise.
        ``warn_on_nan``: warn when decoded clips hold NaN/Inf samples (they are counted and replaced with silence
        either way; `load` turns the warning off for tiny random-init checkpoints, where NaN is expected)."""
        if latent_mode not in LATENT_MODES:
            raise UserError(f"config key 'latent_mode': expected one of {', '.join(LATENT_MODES)}, "
                            f"got {latent_mode!r}")
        if step_noise not in STEP_NOISE:
            raise UserError(f"config key 'step_noise': expected one of {', '.join(STEP_NOISE)}, got {step_noise!r}")
        if num_inference_steps < 1:
            raise UserError(f"config key 'num_inference_steps': expected an integer >= 1, "
                            f"got {num_inference_steps}")
        if audio_seconds <= 0:
            raise UserError(f"config key 'audio_seconds': expected a duration > 0, got {audio_seconds}")
        if short_latent_margin_frames < 0 or decode_batch_size < 1:
            raise UserError("config keys 'short_latent_margin_frames' >= 0 and 'vae_decode_batch_size' >= 1 "
                            f"expected, got {short_latent_margin_frames} and {decode_batch_size}")
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.step_noise = step_noise
        if step_noise == "gaussian" and type(pipeline.scheduler) is CosineDPMSolverMultistepScheduler:
            pipeline.scheduler = CandidateNoiseCosineScheduler.from_config(pipeline.scheduler.config)
        self._custom_noise = type(pipeline.scheduler) is CandidateNoiseCosineScheduler
        self.warn_on_nan = bool(warn_on_nan)
        self.last_nan_samples: list[np.ndarray] = []
        self.compile_transformer = bool(compile_transformer)
        if self.compile_transformer and not getattr(pipeline.transformer, "_compiled_call_impl", None):
            pipeline.transformer.compile()
        self.device = pipeline.transformer.device
        self.dtype = pipeline.transformer.dtype
        self._identity = dict(identity)

        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt or None
        self.audio_seconds = float(audio_seconds)
        self.latent_mode = latent_mode
        self.short_latent_margin_frames = int(short_latent_margin_frames)
        self.decode_batch_size = int(decode_batch_size)
        self.decode_margin_frames = int(decode_margin_frames)

        vae = self.pipeline.vae
        self.sample_rate = int(vae.config.sampling_rate)
        self.hop_length = int(vae.hop_length)
        self.latent_channels = int(self.pipeline.transformer.config.in_channels)
        self.full_latent_frames = int(self.pipeline.transformer.config.sample_size)
        max_seconds = self.full_latent_frames * self.hop_length / self.sample_rate
        if self.audio_seconds > max_seconds:
            raise UserError(f"config key 'audio_seconds': {self.audio_seconds} s is longer than the model's "
                            f"maximum of {max_seconds:.2f} s")
        self.num_samples = int(self.audio_seconds * self.sample_rate)  # what the pipeline's own trim keeps
        needed_frames = math.ceil(self.num_samples / self.hop_length)
        self.latent_frames = (self.full_latent_frames if latent_mode == "full"
                              else min(self.full_latent_frames, needed_frames + self.short_latent_margin_frames))
        # The VAE decoder is convolutional: an output sample depends on latent frames within about +-10 of it
        # (measured on the Oobleck architecture: a change to one frame moves the audio of 10 frames either
        # side, and decoding a prefix with >= 12 extra frames reproduces the full decode to float rounding).
        # Decoding the frames the clip needs plus a margin therefore gives the same trimmed audio as decoding
        # all 1024 frames and trimming, at a fraction of the cost; -1 decodes everything, like diffusers.
        self.decode_frames = (self.latent_frames if self.decode_margin_frames < 0
                              else min(self.latent_frames, needed_frames + self.decode_margin_frames))

    @classmethod
    def load(cls, model: str, *, device: str = "auto", dtype: Any = "auto", **settings) -> "StableAudioGenerator":
        """Loads a StableAudioPipeline checkpoint (directory, hub id or tiny:stable_audio) onto `device`."""
        torch_device, torch_dtype = torch_device_and_dtype(device, dtype, what="generator")
        resolved = resolve_source(model, "config key 'generator_model'", hub_files=DIFFUSERS_PIPELINE_FILES)

        def _load(source: str):
            with warnings.catch_warnings():
                # diffusers >= 0.36 renames torch_dtype to dtype; older releases (>= 0.32 is supported) only
                # know torch_dtype.
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                return StableAudioPipeline.from_pretrained(source, torch_dtype=torch_dtype)

        pipeline = load_component(_load, resolved, "config key 'generator_model'")
        pipeline.to(torch_device)
        # Random tiny weights (in float16 especially) decode to NaN now and then: expected, not worth a warning.
        settings.setdefault("warn_on_nan", not model.strip().startswith(TINY_PREFIX))
        return cls(pipeline, identity=checkpoint_identity(resolved), **settings)

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self._identity,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "audio_seconds": self.audio_seconds,
            "latent_mode": self.latent_mode,
            "latent_frames": self.latent_frames,
            "decode_frames": self.decode_frames,
            # Gaussian step noise is drawn on the pipeline's device: CPU and GPU runs differ, so it is recorded.
            "step_noise": self._step_noise_label(),
            "sample_rate": self.sample_rate,
            "dtype": str(self.dtype).replace("torch.", ""),
            "channels": "mono-mean",
        }

    def _step_noise_label(self) -> str:
        if self._custom_noise and self.step_noise == "gaussian":
            return f"gaussian@{self.device.type}"
        if isinstance(self.pipeline.scheduler, CosineDPMSolverMultistepScheduler):
            return "brownian-per-candidate"
        return f"scheduler-default:{type(self.pipeline.scheduler).__name__}"

    def _initial_latents(self, seeds: Sequence[int]):
        # Drawn in float32 on the CPU from each candidate's own generator: the same noise on every device and
        # for every batch composition; then cast to the pipeline's dtype.
        noise = [torch.randn((self.latent_channels, self.latent_frames), dtype=torch.float32,
                             generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds]
        return torch.stack(noise).to(device=self.device, dtype=self.dtype)

    def denoise(self, prompts: Sequence[str], seeds: Sequence[int], num_candidates: int):
        """The denoised latents ``[len(prompts) * K, C, latent_frames]`` (prompt-major), before the VAE."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        flat_seeds = [candidate_seed(seed, k) for seed in seeds for k in range(num_candidates)]
        latents = self._initial_latents(flat_seeds)
        noise_seeds = [derived_seed(seed, "step-noise") for seed in flat_seeds]
        if self._custom_noise:
            self.pipeline.scheduler.next_step_noise = (
                CandidateStepNoise(noise_seeds, latents.shape[1:], self.device, self.dtype)
                if self.step_noise == "gaussian" else None)
        # With Brownian trees the pipeline reads only initial_seed() of these (one tree per candidate); the
        # initial noise is the `latents` above either way.
        brownian_seeds = [torch.Generator("cpu").manual_seed(seed) for seed in noise_seeds]
        negative = [self.negative_prompt] * len(prompts) if self.negative_prompt else None
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                # torchsde warns when the final sigma (0) lies outside the tree's [sigma_min, sigma_max].
                warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
                output = self.pipeline(
                    list(prompts), negative_prompt=negative, num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale, audio_start_in_s=0.0, audio_end_in_s=self.audio_seconds,
                    num_waveforms_per_prompt=num_candidates, generator=brownian_seeds, latents=latents,
                    output_type="latent")
        finally:
            if self._custom_noise:  # a later plain pipeline call (or a "brownian" generator) gets the stock noise
                self.last_step_noise = self.pipeline.scheduler.next_step_noise
                self.pipeline.scheduler.next_step_noise = None
        return output.audios

    def decode(self, latents) -> np.ndarray:
        """VAE-decodes latents (their first `decode_frames`) in chunks, trims to the requested duration, downmixes
        to mono: float32 [N, S].  NaN/Inf samples become silence."""
        return self.decode_counting_nan(latents)[0]

    def decode_counting_nan(self, latents) -> tuple[np.ndarray, np.ndarray]:
        """`decode`, plus how many samples of each clip were NaN/Inf (and replaced with silence): int [N]."""
        clips = []
        with torch.inference_mode():
            for start in range(0, latents.shape[0], self.decode_batch_size):
                chunk = latents[start:start + self.decode_batch_size, :, :self.decode_frames]
                audio = self.pipeline.vae.decode(chunk).sample
                audio = audio[:, :, :self.num_samples].float().mean(dim=1)
                clips.append(audio.cpu().numpy())
        waveforms = np.concatenate(clips, axis=0).astype(np.float32, copy=False)
        nonfinite = ~np.isfinite(waveforms)
        counts = nonfinite.sum(axis=1)
        if counts.any():
            # Random weights (in float16 especially) produce it; silence keeps the cache valid and the clip then
            # scores low under CLAP.  The counts go into the entry metadata, so a real checkpoint doing it shows.
            waveforms = np.where(nonfinite, np.float32(0.0), waveforms)
        return waveforms, counts

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], num_candidates: int) -> list[np.ndarray]:
        """K clips ``[K, S]`` per prompt; `last_nan_samples` then holds each prompt's NaN/Inf counts ``[K]``."""
        self.last_nan_samples = []
        if not prompts:
            return []
        waveforms, counts = self.decode_counting_nan(self.denoise(prompts, seeds, num_candidates))
        self.last_nan_samples = [counts[i * num_candidates:(i + 1) * num_candidates] for i in range(len(prompts))]
        if self.warn_on_nan and counts.any():
            affected = [f"{prompt!r} ({int(c.astype(bool).sum())} of {num_candidates} clips, {int(c.sum())} samples)"
                        for prompt, c in zip(prompts, self.last_nan_samples) if c.any()]
            warnings.warn(f"stable_audio: decoded audio held NaN/Inf samples, replaced with silence: "
                          f"{'; '.join(affected)}", RuntimeWarning, stacklevel=2)
        return [waveforms[i * num_candidates:(i + 1) * num_candidates] for i in range(len(prompts))]
