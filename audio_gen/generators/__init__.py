"""Audio generators: turn prompts into K candidate clips each.

Every generator has the same small interface, so `build_cache` does not care which one runs:

- ``sample_rate`` (int): the rate of the clips it returns;
- ``settings() -> dict``: everything that changes its output (model identity, steps, duration, ...); it goes
  into the cache fingerprint and into every entry key;
- ``generate(prompts, seeds, num_candidates) -> list[np.ndarray]``: one float32 array ``[K, S]`` (mono) per
  prompt.  ``seeds[i]`` is the prompt's seed (`prompt_seed`); candidate ``k`` uses `candidate_seed(seed, k)`,
  so a prompt's clips depend only on the prompt, the base seed and the settings, never on which other prompts
  share the call or in which order they come;
- optionally ``last_nan_samples``: after `generate`, one integer array ``[K]`` per prompt with how many samples
  of each candidate were NaN/Inf and replaced with silence (``build_cache`` stores it as the entry metadata's
  ``nan_samples``).

Generators: ``stable_audio`` (diffusers' StableAudioPipeline, ITH's generator) and ``tone`` (weight-free sine
tones, for offline demos and the oracle-audio experiment).
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol, Sequence

import numpy as np

__all__ = ["AudioGenerator", "prompt_seed", "candidate_seed", "derived_seed", "build_generator", "GENERATOR_NAMES"]

GENERATOR_NAMES = ("stable_audio", "tone")

# Seeds are 63-bit so they fit torch.Generator.manual_seed and numpy's SeedSequence alike.
_SEED_MASK = (1 << 63) - 1


class AudioGenerator(Protocol):
    sample_rate: int

    def settings(self) -> dict[str, Any]: ...

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], num_candidates: int) -> list[np.ndarray]: ...


def _hash_to_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & _SEED_MASK


def prompt_seed(prompt: str, base_seed: int) -> int:
    """The seed of one prompt: a hash of (base seed, prompt), independent of batch and order."""
    return _hash_to_seed(f"prompt\0{int(base_seed)}\0{prompt}")


def candidate_seed(seed: int, candidate_index: int) -> int:
    return _hash_to_seed(f"candidate\0{int(seed)}\0{int(candidate_index)}")


def derived_seed(seed: int, purpose: str) -> int:
    """Another independent stream from one seed (e.g. a candidate's step noise next to its initial noise)."""
    return _hash_to_seed(f"{purpose}\0{int(seed)}")


def build_generator(config) -> AudioGenerator:
    """Builds the generator named by ``config.generator`` from the ``configs/gen.py`` keys."""
    from ith_common.errors import UserError

    name = config.generator
    if name == "stable_audio":
        from audio_gen.generators.stable_audio import StableAudioGenerator

        return StableAudioGenerator.load(
            config.generator_model, device=config.device, dtype=config.dtype,
            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
            negative_prompt=config.negative_prompt, audio_seconds=config.audio_seconds,
            latent_mode=config.latent_mode, short_latent_margin_frames=config.short_latent_margin_frames,
            decode_batch_size=config.vae_decode_batch_size, decode_margin_frames=config.vae_decode_margin_frames,
            compile_transformer=config.compile_transformer, step_noise=config.step_noise)
    if name == "tone":
        from audio_gen.generators.tone import ToneGenerator

        return ToneGenerator(sample_rate=config.tone_sample_rate, audio_seconds=config.audio_seconds,
                             frequencies_file=config.tone_frequencies or None)
    raise UserError(f"config key 'generator': expected one of {', '.join(GENERATOR_NAMES)}, got {name!r}")
