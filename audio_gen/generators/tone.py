"""A weight-free generator of sine tones, with the same interface as the Stable Audio one.

Uses: the offline demo (no checkpoint to load, runs in milliseconds) and the roadmap's oracle-audio
experiment, where the pitch of the "imagined" sound encodes the answer.  Each prompt gets a base frequency:

- from ``frequencies_file`` when the prompt is listed there, which is how the ORACLE experiment
  (``configs/gen.py:oracle``) decides the pitch of each prompt.  The file is either a flat JSON object
  ``{"<prompt>": hertz, ...}`` or the table `python -m audio_gen.pitch_table` writes, ``{"_note": ...,
  "frequencies": {"<prompt>": hertz, ...}}`` (top-level keys starting with ``_`` are metadata).  A prompt
  missing from the table is looked up case-insensitively next: gold span manifests keep the sentence's
  casing ("Room tone of ...") where AuditoryBench's span columns, from which the table is fitted, have
  "room tone of ..." (48 of the 15,264 distinct pitch train + dev prompts).  Keys that differ only in case
  and disagree on the pitch are left out of that second lookup;
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

from ith_common.errors import UserError
from audio_gen.generators import candidate_seed

MIN_HZ, MAX_HZ = 110.0, 1760.0
_FADE_SECONDS = 0.01  # short fades avoid clicks at the clip edges


def load_frequencies(path: str | None) -> dict[str, float]:
    """``{prompt: hertz}`` from a flat table or from `audio_gen.pitch_table`'s ``{"frequencies": {...}}``."""
    if not path:
        return {}
    file = pathlib.Path(path)
    expected = "expected a JSON object {\"<prompt>\": hertz} or a pitch table {\"frequencies\": {\"<prompt>\": hertz}}"
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config key 'tone_frequencies': {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: line {error.lineno}: not valid JSON ({error.msg}); {expected}") from None
    if not isinstance(table, dict):
        raise UserError(f"{path}: {expected}, got {type(table).__name__}")
    where = ""
    if isinstance(table.get("frequencies"), dict):  # a pitch table: the prompts sit under "frequencies"
        extra = sorted(key for key in table if key != "frequencies" and not key.startswith("_"))
        if extra:
            raise UserError(f"{path}: field {extra[0]!r}: a pitch table has only \"frequencies\" and "
                            "metadata keys starting with '_'")
        table, where = table["frequencies"], "frequencies."
    else:  # a flat table; its "_..." keys are metadata too
        table = {prompt: hertz for prompt, hertz in table.items() if not prompt.startswith("_")}
    for prompt, hertz in table.items():
        if isinstance(hertz, bool) or not isinstance(hertz, (int, float)) or not 0 < hertz < 20000:
            raise UserError(f"{path}: field {where + prompt!r}: expected a frequency in Hz in (0, 20000), "
                            f"got {hertz!r}")
    return {prompt: float(hertz) for prompt, hertz in table.items()}


class ToneGenerator:
    name = "tone"

    def __init__(self, *, sample_rate: int = 16000, audio_seconds: float = 5.0, frequencies_file: str | None = None,
                 max_detune: float = 0.03, noise_level: float = 0.01):
        if sample_rate < 1000 or audio_seconds <= 0:
            raise UserError(f"tone generator: expected sample_rate >= 1000 and audio_seconds > 0, got "
                            f"{sample_rate} and {audio_seconds}")
        self.sample_rate = int(sample_rate)
        self.audio_seconds = float(audio_seconds)
        self.frequencies_file = frequencies_file
        self.frequencies = load_frequencies(frequencies_file)
        by_casefold: dict[str, set[float]] = {}
        for prompt, hertz in self.frequencies.items():
            by_casefold.setdefault(prompt.casefold(), set()).add(hertz)
        self._casefolded = {folded: next(iter(hz)) for folded, hz in by_casefold.items() if len(hz) == 1}
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
            # The table's content, not its path, so the same table elsewhere gives the same cache keys; as a
            # digest, because the settings are hashed into every entry key (a 15,000-prompt table inline made
            # key computation take minutes) and stored in every summary.
            "frequencies": frequency_table_digest(self.frequencies),
            "table_lookup": "exact, then casefold",
        }

    def table_frequency(self, prompt: str) -> float | None:
        """The table's pitch of `prompt` (exact key, else case-insensitive), or None when it has none."""
        hertz = self.frequencies.get(prompt)
        return hertz if hertz is not None else self._casefolded.get(prompt.casefold())

    def frequency_for(self, prompt: str) -> float:
        hertz = self.table_frequency(prompt)
        if hertz is not None:
            return hertz
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


def frequency_table_digest(frequencies: dict[str, float]) -> dict[str, Any] | None:
    """``{"prompts": n, "sha256": hex}`` of a pitch table's ``{prompt: hertz}`` (sorted, canonical JSON); None
    for no table (every pitch hashed from its prompt)."""
    if not frequencies:
        return None
    canonical = json.dumps(frequencies, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return {"prompts": len(frequencies), "sha256": hashlib.sha256(canonical.encode("ascii")).hexdigest()}


def hash_prompt(prompt: str) -> int:
    """A stable 63-bit hash of a prompt (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)
