"""Frozen audio encoders that turn clips into a fixed number T of audio tokens for the fusion layer (or, with
``ast_fbank``, into the inputs of an AST that the LM trains itself).

    encoder = build_encoder("ast", "MIT/ast-finetuned-audioset-10-10-0.4593", num_tokens=8, device="cuda")
    tokens, mask = encoder.encode([waveform, ...], sample_rate=44100)  # float16 [N, T, D], bool [N, T]

Encoders (shapes per clip, see docs/audio_tokens.md):

- ``ast``: transformers ``ASTModel`` (16 kHz, 128 mel bins x 1024 frames = 10.24 s). ``last_hidden_state`` is
  2 special tokens + a 12 (frequency) x 101 (time) patch grid of 768-d tokens.  We drop the special tokens,
  average over the frequency patches and keep the time patches that overlap the clip (49 for 5 s; the rest of
  the 10.24 s window is padding), then pool those to T.  D = 768.
- ``clap``: the CLAP audio branch (HTSAT) of a ``ClapModel``.  ``last_hidden_state`` is [768, 2, 32]: 2
  frequency groups x 32 time steps over the 10 s window; we average the frequency groups, keep the time
  steps the clip covers (16 of 32 for 5 s; the extractor repeats shorter clips to fill the window, which we
  do not want twice), and pool to T.  D = 768.
- ``logmel``: no weights; 64-bin log-mel frames (25 ms window, 10 ms hop at 16 kHz) pooled to T.  D = 64.
  For experiments (the oracle-audio one), tests and the offline demo.  Vectorised: one batched STFT and mel
  matmul per batch of equal-length clips (`LogMelEncoder.tokens_of_equal_length`).
- ``ast_fbank``: no model, only the ``ASTFeatureExtractor`` of an AST checkpoint: its normalised log-mel
  filterbank ``input_values`` [max_length, num_mel_bins] (1024 x 128 for the real one) are stored as the "tokens"
  (T = max_length, D = num_mel_bins, no pooling; ``num_tokens`` is ignored), for ``audio.encoder=ast_trainable``,
  where the LM runs (and trains) its own Flax AST on them.  The mask is True on the frames computed from audio
  (`features.ast_frame_count`, at least one) and False on the extractor's padding frames.  256 KiB per 5 s
  candidate at full size, float16.

Pooling: the valid frames are split into T contiguous, near-equal segments and each is averaged (adaptive
average pooling), so token t always summarises the t-th slice of the clip, whatever its length.  A clip with
fewer valid frames than T gets its frames as they are and ``mask = False`` for the missing tokens.
Resampling to the encoder's rate uses soxr.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import numpy as np
import torch
from transformers import ASTFeatureExtractor, ASTModel
from transformers.audio_utils import mel_filter_bank

from audio_gen.clap import _ClapBase, resample
from audio_gen.features import ast_features, ast_frame_count
from audio_gen.pretrained import checkpoint_identity, load_component, resolve_source, torch_device_and_dtype
from ith_common.errors import UserError

ENCODER_NAMES = ("ast", "clap", "logmel", "ast_fbank")
DEFAULT_ENCODER_MODELS = {"ast": "MIT/ast-finetuned-audioset-10-10-0.4593", "clap": "laion/clap-htsat-fused",
                          "logmel": None, "ast_fbank": "MIT/ast-finetuned-audioset-10-10-0.4593"}


def pool_frames(frames, valid_frames: int, num_tokens: int):
    """Adaptive-average-pools the first `valid_frames` rows of ``frames [L, D]`` (torch) into ``[T, D]``."""
    valid_frames = max(1, min(int(valid_frames), frames.shape[0]))
    valid = frames[:valid_frames].float()
    mask = torch.ones(num_tokens, dtype=torch.bool)
    if valid_frames >= num_tokens:
        tokens = torch.nn.functional.adaptive_avg_pool1d(valid.T.unsqueeze(0), num_tokens)[0].T
    else:
        tokens = torch.zeros((num_tokens, frames.shape[1]), dtype=torch.float32, device=frames.device)
        tokens[:valid_frames] = valid
        mask[valid_frames:] = False
    return tokens, mask


def _stack_outputs(token_list, mask_list) -> tuple[np.ndarray, np.ndarray]:
    tokens = torch.stack(token_list).float().cpu().numpy()
    if not np.isfinite(tokens).all() or np.abs(tokens).max(initial=0.0) > 65504.0:
        raise UserError("audio encoder produced values that do not fit float16 (non-finite or > 65504)")
    return tokens.astype(np.float16), torch.stack(mask_list).cpu().numpy().astype(bool)


class _Encoder:
    name = ""

    def __init__(self, num_tokens: int, batch_size: int):
        if int(num_tokens) < 1:
            raise UserError(f"config key 'num_tokens': expected an integer >= 1, got {num_tokens}")
        if int(batch_size) < 1:
            raise UserError(f"config key 'encoder_batch_size': expected an integer >= 1, got {batch_size}")
        self.num_tokens = int(num_tokens)
        self.batch_size = int(batch_size)

    def _base_settings(self) -> dict[str, Any]:
        return {"name": self.name, "num_tokens": self.num_tokens, "dim": self.dim, "sample_rate": self.sample_rate,
                "pooling": "adaptive-mean-over-valid-time"}

    def encode(self, waveforms: Sequence[np.ndarray], sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
        waveforms = list(waveforms)
        if not waveforms:
            return (np.zeros((0, self.num_tokens, self.dim), np.float16), np.zeros((0, self.num_tokens), bool))
        clips = []
        for index, waveform in enumerate(waveforms):
            waveform = np.asarray(waveform, dtype=np.float32)
            if waveform.ndim != 1 or waveform.size == 0:
                raise UserError(f"audio encoder {self.name}: waveform {index}: expected a non-empty mono "
                                f"array [samples], got shape {waveform.shape}")
            clips.append(resample(waveform, sample_rate, self.sample_rate))
        token_list, mask_list = [], []
        for start in range(0, len(clips), self.batch_size):
            tokens, masks = self._encode_batch(clips[start:start + self.batch_size])
            token_list.extend(tokens)
            mask_list.extend(masks)
        return _stack_outputs(token_list, mask_list)


class AstEncoder(_Encoder):
    name = "ast"

    def __init__(self, model_path_or_id: str, num_tokens: int, device: Any, dtype: Any, batch_size: int = 16):
        torch_device, torch_dtype = torch_device_and_dtype(str(device), dtype, what="AST encoder")
        resolved = resolve_source(model_path_or_id, "config key 'encoder_model'")

        def _load(path: str):
            return ASTFeatureExtractor.from_pretrained(path), ASTModel.from_pretrained(path)

        extractor, model = load_component(_load, resolved, "config key 'encoder_model'")
        model.to(device=torch_device, dtype=torch_dtype)
        self._setup(extractor, model, checkpoint_identity(resolved), num_tokens, batch_size)

    @classmethod
    def from_loaded(cls, extractor, model, *, identity: dict, num_tokens: int, batch_size: int = 16):
        instance = cls.__new__(cls)
        instance._setup(extractor, model, dict(identity), num_tokens, batch_size)
        return instance

    def _setup(self, extractor, model, identity: dict, num_tokens: int, batch_size: int) -> None:
        _Encoder.__init__(self, num_tokens, batch_size)
        self.extractor, self.model, self.identity = extractor, model.eval(), identity
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        config = self.model.config
        self.sample_rate = int(self.extractor.sampling_rate)
        self.dim = int(config.hidden_size)
        self.max_frames = int(config.max_length)
        self.frequency_patches = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
        self.time_patches = (config.max_length - config.patch_size) // config.time_stride + 1
        self.time_stride = int(config.time_stride)

    def settings(self) -> dict[str, Any]:
        return {**self._base_settings(), "model": self.identity, "dtype": str(self.dtype).replace("torch.", "")}

    def valid_time_patches(self, num_samples: int) -> int:
        # A patch is valid if it starts on a frame computed from audio.
        frames = ast_frame_count(num_samples, self.max_frames)
        return max(1, min(self.time_patches, -(-frames // self.time_stride)))

    def _encode_batch(self, clips):
        # The extractor's fbank features, computed batched on the model's device (the stock extractor loops
        # over frames in numpy, ~45 ms per 5 s clip).
        input_values = ast_features(self.extractor, clips, self.device)
        with torch.inference_mode():
            hidden = self.model(input_values.to(self.device, self.dtype)).last_hidden_state
        # Drop [CLS] and distillation tokens; the patch grid is frequency-major: [N, F, T, D] -> mean over F.
        grid = hidden[:, 2:].reshape(hidden.shape[0], self.frequency_patches, self.time_patches, self.dim)
        per_time = grid.float().mean(dim=1)
        pooled = [pool_frames(per_time[i], self.valid_time_patches(len(clip)), self.num_tokens)
                  for i, clip in enumerate(clips)]
        return [p[0] for p in pooled], [p[1] for p in pooled]


class ClapAudioEncoder(_Encoder):
    name = "clap"

    def __init__(self, model_path_or_id: str, num_tokens: int, device: Any, dtype: Any, batch_size: int = 16):
        # Shares the loaded model with a ClapScorer of the same checkpoint, device and dtype (load_clap cache).
        self._setup(_ClapBase(model_path_or_id, device, dtype, batch_size), num_tokens, batch_size)

    @classmethod
    def from_loaded(cls, model, processor, *, identity: dict, num_tokens: int, batch_size: int = 16):
        instance = cls.__new__(cls)
        instance._setup(_ClapBase.from_loaded(model, processor, identity=identity, batch_size=batch_size),
                        num_tokens, batch_size)
        return instance

    def _setup(self, clap: _ClapBase, num_tokens: int, batch_size: int) -> None:
        _Encoder.__init__(self, num_tokens, batch_size)
        self.clap = clap
        self.identity = clap.identity
        self.device, self.dtype = clap.device, clap.dtype
        self.sample_rate = clap.sample_rate
        self.window_samples = clap.window_samples
        self.dim = int(clap.model.config.audio_config.hidden_size)
        self.fused = clap.fused

    def settings(self) -> dict[str, Any]:
        return {**self._base_settings(), "model": self.identity, "fused": self.fused,
                "dtype": str(self.dtype).replace("torch.", "")}

    def _encode_batch(self, clips):
        inputs = self.clap._audio_inputs(clips, self.sample_rate)
        with torch.inference_mode():
            hidden = self.clap.model.audio_model(**inputs).last_hidden_state  # [N, D, frequency groups, time]
        per_time = hidden.float().mean(dim=2).transpose(1, 2)  # [N, time, D]
        steps = per_time.shape[1]
        token_list, mask_list = [], []
        for i, clip in enumerate(clips):
            covered = min(1.0, len(clip) / self.window_samples)
            tokens, mask = pool_frames(per_time[i], int(np.ceil(covered * steps)), self.num_tokens)
            token_list.append(tokens)
            mask_list.append(mask)
        return token_list, mask_list


class LogMelEncoder(_Encoder):
    name = "logmel"

    def __init__(self, num_tokens: int, *, num_mels: int = 64, sample_rate: int = 16000, batch_size: int = 16):
        super().__init__(num_tokens, batch_size)
        self.sample_rate = int(sample_rate)
        self.dim = int(num_mels)
        self.window_length, self.hop_length = 400, 160  # 25 ms / 10 ms at 16 kHz
        filters = mel_filter_bank(num_frequency_bins=self.window_length // 2 + 1, num_mel_filters=self.dim,
                                  min_frequency=20.0, max_frequency=self.sample_rate / 2,
                                  sampling_rate=self.sample_rate, norm="slaney", mel_scale="slaney")
        self.filters = torch.from_numpy(np.asarray(filters, dtype=np.float32))  # [freq, mels]
        self.window = torch.hann_window(self.window_length)

    def settings(self) -> dict[str, Any]:
        return {**self._base_settings(), "window": self.window_length, "hop": self.hop_length,
                "log": "ln(mel_power + 1e-6)"}

    def _encode_batch(self, clips):
        # One batched STFT, one mel matmul and one pooling call per group of equal-length clips (a batch of
        # generated clips is one group): per clip, the same arithmetic as framing each clip on its own.
        token_list, mask_list = [None] * len(clips), [None] * len(clips)
        by_length: dict[int, list[int]] = {}
        for index, clip in enumerate(clips):
            by_length.setdefault(max(len(clip), self.window_length), []).append(index)
        with torch.inference_mode():
            for length, indices in by_length.items():
                # Stacked in numpy: row-wise copies into a torch tensor took ~10 ms per 5 s clip here.
                signals = np.zeros((len(indices), length), dtype=np.float32)
                for row, index in enumerate(indices):  # clips shorter than one window are zero-padded to it
                    signals[row, :len(clips[index])] = clips[index]
                tokens, masks = self.tokens_of_equal_length(torch.from_numpy(signals))
                for row, index in enumerate(indices):
                    token_list[index], mask_list[index] = tokens[row], masks[row]
        return token_list, mask_list

    def tokens_of_equal_length(self, signals):
        """``signals [B, N]`` (float32, N >= window) -> tokens ``[B, T, mels]`` and mask ``[B, T]``."""
        spectrum = torch.stft(signals, n_fft=self.window_length, hop_length=self.hop_length, window=self.window,
                              center=False, return_complex=True)  # [B, freq, frames]
        # |X|^2 as re^2 + im^2: abs().pow(2) takes a square root first and was slower than the STFT itself.
        power = (spectrum.real.square() + spectrum.imag.square()).transpose(1, 2)  # [B, frames, freq]
        frames = torch.log(power @ self.filters + 1e-6)  # [B, frames, mels]
        batch, num_frames, _ = frames.shape
        mask = torch.ones((batch, self.num_tokens), dtype=torch.bool)
        if num_frames >= self.num_tokens:  # adaptive average pooling over time, as `pool_frames`
            tokens = torch.nn.functional.adaptive_avg_pool1d(frames.transpose(1, 2), self.num_tokens).transpose(1, 2)
        else:  # fewer frames than tokens: the frames as they are, the rest padding
            tokens = torch.zeros((batch, self.num_tokens, self.dim), dtype=torch.float32)
            tokens[:, :num_frames] = frames
            mask[:, num_frames:] = False
        return tokens, mask


def _check_ast_extractor(directory: str, what: str) -> None:
    """Refuses a checkpoint without feature extractor settings, or with another model's: ``from_pretrained`` would
    quietly fall back to the AST defaults (it also reads the ``feature_extractor`` of a processor_config.json)."""
    try:
        settings, _ = ASTFeatureExtractor.get_feature_extractor_dict(directory)
    except (OSError, ValueError) as error:
        if not any((pathlib.Path(directory) / name).is_file()
                   for name in ("preprocessor_config.json", "processor_config.json")):
            raise UserError(f"{what}: {directory} has no preprocessor_config.json (expected an AST checkpoint with "
                            f"its ASTFeatureExtractor settings, e.g. {DEFAULT_ENCODER_MODELS['ast_fbank']})") from None
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{what}: {directory}: could not read the feature extractor settings: {first_line}") from None
    if not isinstance(settings, dict):
        raise UserError(f"{what}: {directory}: preprocessor_config.json: expected a JSON object (an "
                        f"ASTFeatureExtractor's settings), got {type(settings).__name__}")
    kind = settings.get("feature_extractor_type")
    if kind not in (None, "ASTFeatureExtractor"):
        raise UserError(f"{what}: {directory}: field 'feature_extractor_type': expected ASTFeatureExtractor, "
                        f"got {kind!r}")


class AstFbankEncoder(_Encoder):
    """The AST feature extractor's output per clip, for an AST trained inside the LM (``audio.encoder=ast_trainable``).

    "Tokens" are the normalised filterbank frames ``[max_length, num_mel_bins]`` exactly as ``ASTFeatureExtractor``
    gives them (batched by `features.ast_features`, float64, then stored float16); T = max_length whatever
    ``num_tokens`` says.  ``settings()`` carries what the JAX side checks its AST against."""
    name = "ast_fbank"

    def __init__(self, model_path_or_id: str, device: Any = "cpu", batch_size: int = 16):
        # The features are computed in float64 whatever the device: no dtype to choose.
        torch_device, _ = torch_device_and_dtype(str(device), "float32", what="AST fbank encoder")
        what = "config key 'encoder_model'"
        resolved = resolve_source(model_path_or_id, what)
        _check_ast_extractor(resolved, what)
        extractor = load_component(ASTFeatureExtractor.from_pretrained, resolved, what)
        _Encoder.__init__(self, int(extractor.max_length), batch_size)  # num_tokens = T = the window's frames
        self.extractor, self.identity, self.device = extractor, checkpoint_identity(resolved), torch_device
        self.sample_rate = int(extractor.sampling_rate)
        self.max_length = int(extractor.max_length)
        self.dim = int(extractor.num_mel_bins)

    def settings(self) -> dict[str, Any]:
        extractor = self.extractor
        return {"name": self.name, "stores": "features", "features": "ast-fbank", "model": self.identity,
                "sampling_rate": self.sample_rate, "num_mel_bins": self.dim, "max_length": self.max_length,
                "do_normalize": bool(extractor.do_normalize), "mean": float(extractor.mean),
                "std": float(extractor.std)}

    def _encode_batch(self, clips):
        features = ast_features(self.extractor, clips, self.device)
        frames = torch.arange(self.max_length)
        masks = [frames < ast_frame_count(len(clip), self.max_length) for clip in clips]
        return list(features), masks


def build_encoder(name: str, model_path_or_id: str | None, num_tokens: int, device: Any = "cpu", dtype: Any = "auto",
                  batch_size: int = 16):
    """An encoder by name (``ast`` | ``clap`` | ``logmel`` | ``ast_fbank``); ``model_path_or_id`` None or "" means
    the default checkpoint; it is ignored by ``logmel``.  ``num_tokens`` is ignored by ``ast_fbank`` (T is its
    extractor's max_length) and ``dtype`` too (its features are computed in float64)."""
    if name not in ENCODER_NAMES:
        raise UserError(f"config key 'encoder': expected one of {', '.join(ENCODER_NAMES)}, got {name!r}")
    model = model_path_or_id or DEFAULT_ENCODER_MODELS[name]
    if name == "ast":
        return AstEncoder(model, num_tokens, device, dtype, batch_size)
    if name == "clap":
        return ClapAudioEncoder(model, num_tokens, device, dtype, batch_size)
    if name == "ast_fbank":
        return AstFbankEncoder(model, device, batch_size)
    return LogMelEncoder(num_tokens, batch_size=batch_size)
