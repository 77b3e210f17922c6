"""CLAP text-audio similarity through transformers' `ClapModel` / `ClapProcessor`.

ITH scores every generated clip against its span text with LAION's CLAP (``laion/clap-htsat-fused``, the
default here; ``laion/clap-htsat-unfused`` is selectable).  The ``laion-clap`` package is not used: it pins
numpy<2, imports torchvision and calls the hub at import, so it cannot share an environment with JAX.

    scorer = ClapScorer("laion/clap-htsat-fused", device="cuda")
    scorer.score(["dog barking"], [waveform], sample_rate=44100)   # -> array([0.41], dtype=float32)

Embeddings are the projected, L2-normalised CLAP embeddings, so a score is a cosine similarity in [-1, 1].
Audio is resampled (soxr) to the feature extractor's rate and converted with its settings (10 s windows at
48 kHz, "repeatpad" for shorter clips, "fusion"/"rand_trunc" for longer ones); clips within the window go
through `audio_gen.features.clap_features`, a batched torch version of the extractor on the model's device
(the stock one loops over frames in numpy, ~70 ms per clip).  The random crop that
"rand_trunc" and "fusion" take of clips longer than the window is made deterministic by running the
extractor under a fixed numpy seed (and the caller's global numpy random state is restored afterwards).

One deliberate difference from the stock feature extractor (and LAION's code): with the fused model, a clip
shorter than the window never takes the fusion branch, whatever else is in its batch (see `_audio_inputs`), so
a clip's score does not depend on its batch companions or on chance.

Loaded models are shared within a process (`load_clap`): the ``clap`` audio encoder and the scorer reuse one
copy when they name the same checkpoint, device and dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import soxr
import torch
from transformers import ClapModel, ClapProcessor

from audio_gen.features import clap_features, clap_supported
from audio_gen.pretrained import checkpoint_identity, load_component, resolve_source, torch_device_and_dtype
from ith_common.errors import UserError

DEFAULT_CLAP_MODEL = "laion/clap-htsat-fused"
# numpy seed for the extractor's random crops of over-long clips (see module doc).
_EXTRACTOR_SEED = 0


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Mono float32 resampling with soxr (high quality); a no-op when the rates match."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"expected a mono waveform [samples], got shape {waveform.shape}")
    if int(from_rate) == int(to_rate):
        return waveform
    return soxr.resample(waveform, int(from_rate), int(to_rate), quality="HQ").astype(np.float32, copy=False)


@functools.lru_cache(maxsize=4)
def load_clap(source: str, device: str, dtype_name: str):
    """(model, processor, resolved source) for a CLAP checkpoint; cached per process."""
    dtype = getattr(torch, dtype_name)
    resolved = resolve_source(source, "CLAP model")

    def _load(path: str):
        # Loaded as stored, then cast: `from_pretrained(dtype=...)` is transformers >= 4.56 only.
        return ClapModel.from_pretrained(path), ClapProcessor.from_pretrained(path)

    model, processor = load_component(_load, resolved, "CLAP model")
    model.to(device=device, dtype=dtype).eval()
    return model, processor, resolved


class _ClapBase:
    def __init__(self, model_path_or_id: str, device: Any, dtype: Any, batch_size: int):
        device, dtype = torch_device_and_dtype(str(device), dtype, what="CLAP")
        model, processor, resolved = load_clap(model_path_or_id, str(device), str(dtype).replace("torch.", ""))
        self._setup(model, processor, checkpoint_identity(resolved), batch_size)

    @classmethod
    def from_loaded(cls, model, processor, *, identity: dict, batch_size: int = 16):
        """Wraps an already-built ClapModel + ClapProcessor (benchmarks build full-size random ones in memory)."""
        instance = cls.__new__(cls)
        instance._setup(model.eval(), processor, dict(identity), batch_size)
        return instance

    def _setup(self, model, processor, identity: dict, batch_size: int) -> None:
        if batch_size < 1:
            raise UserError(f"CLAP batch size: expected an integer >= 1, got {batch_size}")
        self.model, self.processor, self.identity = model, processor, identity
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.batch_size = int(batch_size)
        extractor = self.processor.feature_extractor
        self.sample_rate = int(extractor.sampling_rate)
        self.window_samples = int(extractor.nb_max_samples)
        self.fused = bool(self.model.config.audio_config.enable_fusion)

    def _audio_inputs(self, waveforms: Sequence[np.ndarray], sample_rate: int) -> dict:
        clips = [resample(w, sample_rate, self.sample_rate) for w in waveforms]
        for index, clip in enumerate(clips):
            if clip.size == 0:
                raise UserError(f"CLAP: waveform {index} is empty")
        extractor = self.processor.feature_extractor
        if clap_supported(extractor, clips):
            # Clips within the window (all of build_cache's): the batched torch version of the extractor, on the
            # model's device; none of them is longer, so none takes the fusion branch.
            features = clap_features(extractor, clips, self.device)
            is_longer = torch.zeros((len(clips), 1), dtype=torch.bool)
        else:
            state = np.random.get_state()
            try:
                np.random.seed(_EXTRACTOR_SEED)
                extracted = extractor(clips, sampling_rate=self.sample_rate, return_tensors="pt")
            finally:
                np.random.set_state(state)
            features = extracted["input_features"]
            # When no clip of a batch is longer than the window, the extractor marks a random one as "longer"
            # (a training-time habit copied from LAION's HTSAT), which sends that clip through the fusion
            # branch: its embedding would then depend on chance and on its batch companions.  Only clips that
            # really are longer take the fusion branch here.
            really_longer = torch.tensor([[len(clip) > self.window_samples] for clip in clips])
            is_longer = extracted["is_longer"].bool() & really_longer
        inputs = {"input_features": features.to(self.device, self.dtype)}
        if self.fused:
            inputs["is_longer"] = is_longer.to(self.device)
        return inputs


class ClapScorer(_ClapBase):
    """Cosine similarity between texts and clips in CLAP's joint embedding space."""

    def __init__(self, model_path_or_id: str = DEFAULT_CLAP_MODEL, device: Any = "cpu", dtype: Any = "float32",
                 batch_size: int = 16):
        super().__init__(model_path_or_id, device, dtype, batch_size)

    def settings(self) -> dict[str, Any]:
        return {"model": self.identity, "fused": self.fused, "dtype": str(self.dtype).replace("torch.", ""),
                "embedding": "projected-l2"}

    @staticmethod
    def _pooled(output) -> "Any":
        # transformers 5 returns a model output whose pooler_output is the normalised projection; 4.x a tensor.
        return output if hasattr(output, "norm") else output.pooler_output

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.model.config.projection_dim), np.float32)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.processor.tokenizer(texts[start:start + self.batch_size], padding=True,
                                                  truncation=True, return_tensors="pt").to(self.device)
                embedding = self._pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                                      attention_mask=tokens["attention_mask"]))
                chunks.append(torch.nn.functional.normalize(embedding.float(), dim=-1).cpu().numpy())
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def embed_audio(self, waveforms: Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
        waveforms = list(waveforms)
        if not waveforms:
            return np.zeros((0, self.model.config.projection_dim), np.float32)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(waveforms), self.batch_size):
                inputs = self._audio_inputs(waveforms[start:start + self.batch_size], sample_rate)
                embedding = self._pooled(self.model.get_audio_features(**inputs))
                chunks.append(torch.nn.functional.normalize(embedding.float(), dim=-1).cpu().numpy())
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def score(self, texts: Sequence[str], waveforms: Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
        """Cosine similarity of texts[i] and waveforms[i]: float32 [N]."""
        texts, waveforms = list(texts), list(waveforms)
        if len(texts) != len(waveforms):
            raise ValueError(f"{len(texts)} texts but {len(waveforms)} waveforms")
        # Texts repeat (K candidates share one span text): embed each distinct text once.
        distinct = list(dict.fromkeys(texts))
        text_embeddings = dict(zip(distinct, self.embed_text(distinct)))
        audio_embeddings = self.embed_audio(waveforms, sample_rate)
        if not texts:
            return np.zeros((0,), np.float32)
        stacked = np.stack([text_embeddings[text] for text in texts])
        return np.sum(stacked * audio_embeddings, axis=-1).astype(np.float32)
