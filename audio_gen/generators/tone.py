"""A weight-free generator of sine tones, with the same interface as the Stable Audio one.

Uses: the offline demo (no checkpoint to load, runs in milliseconds) and the roadmap's oracle-audio
experiment, where the pitch of the "imagined" sound encodes the answer.  Each prompt gets a base frequency:

- from ``frequencies_file`` (JSON object ``{"<prompt>": hertz, ...}``) when the prompt is listed there, which
  is how the oracle experiment decides the pitch of each prompt;
- otherwise from a hash of the prompt, log-uniform in [110, 1760] Hz (A2..A6), so the same prompt always
  gets the same tone.

Candidate k is that tone detuned by up to +-3 %, with its own phase, loudness and a little noise, all drawn
from the candidate's seed: K candidates differ (so CLAP scores and selection have something to choose from)
while staying recognisably the same pitch.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
from typing import Any, Sequence

import numpy as np

from audio_gen.errors import AudioGenError
from audio_gen.generators import candidate_seed

MIN_HZ, MAX_HZ = 110.0, 1760.0
_FADE_SECONDS = 0.01  # short fades avoid clicks at the clip edges


def load_frequencies(path: str | None) -> dict[str, float]:
    if not path:
        return {}
    file = pathlib.Path(path)
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AudioGenError(f"config key 'tone_frequencies': {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise AudioGenError(f"{path}: line {error.lineno}: not valid JSON ({error.msg}); "
                            "expected an object {\"<prompt>\": hertz}") from None
    if not isinstance(table, dict):
        raise AudioGenError(f"{path}: expected a JSON object {{\"<prompt>\": hertz}}, got {type(table).__name__}")
    for prompt, hertz in table.items():
        if isinstance(hertz, bool) or not isinstance(hertz, (int, float)) or not 0 < hertz < 20000:
            raise AudioGenError(f"{path}: field {prompt!r}: expected a frequency in Hz in (0, 20000), got {hertz!r}")
    return {prompt: float(hertz) for prompt, hertz in table.items()}


class ToneGenerator:
    name = "tone"

    def __init__(self, *, sample_rate: int = 16000, audio_seconds: float = 5.0, frequencies_file: str | None = None,
                 max_detune: float = 0.03, noise_level: float = 0.01):
        if sample_rate < 1000 or audio_seconds <= 0:
            raise AudioGenError(f"tone generator: expected sample_rate >= 1000 and audio_seconds > 0, got "
                                f"{sample_rate} and {audio_seconds}")
        self.sample_rate = int(sample_rate)
        self.audio_seconds = float(audio_seconds)
        self.frequencies_file = frequencies_file
        self.frequencies = load_frequencies(frequencies_file)
        self.max_detune = float(max_detune)
        self.noise_level = float(noise_level)
        self.num_samples = int(self.audio_seconds * self.sample_rate)

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sample_rate": self.sample_rate,
            "audio_seconds": self.audio_seconds,
            "max_detune": self.max_detune,
            "noise_level": self.noise_level,
            # The table's content, not its path: the same table elsewhere gives the same cache keys.
            "frequencies": dict(sorted(self.frequencies.items())),
        }

    def frequency_for(self, prompt: str) -> float:
        if prompt in self.frequencies:
            return self.frequencies[prompt]
        unit = hash_prompt(prompt) / float(1 << 63)
        return MIN_HZ * (MAX_HZ / MIN_HZ) ** unit

    def _clip(self, base_hz: float, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        hertz = base_hz * (1.0 + rng.uniform(-self.max_detune, self.max_detune))
        phase = rng.uniform(0.0, 2.0 * math.pi)
        amplitude = rng.uniform(0.3, 0.8)
        t = np.arange(self.num_samples, dtype=np.float64) / self.sample_rate
        clip = amplitude * np.sin(2.0 * math.pi * hertz * t + phase)
        clip += self.noise_level * rng.standard_normal(self.num_samples)
        fade = min(int(_FADE_SECONDS * self.sample_rate), self.num_samples // 2)
        if fade > 0:
            ramp = np.linspace(0.0, 1.0, fade)
            clip[:fade] *= ramp
            clip[-fade:] *= ramp[::-1]
        return clip.astype(np.float32)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], num_candidates: int) -> list[np.ndarray]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        return [np.stack([self._clip(self.frequency_for(prompt), candidate_seed(seed, k))
                          for k in range(num_candidates)])
                for prompt, seed in zip(prompts, seeds)]


def hash_prompt(prompt: str) -> int:
    """A stable 63-bit hash of a prompt (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)
