"""A PyTorch reference for ``ith_jax.models.fusion``: ITH's modules, with the key padding mask ITH lacks.

Module layout and names follow ITH's official ``model.py`` (``AudioMLP.net``, ``FusionLayer.mha / norm1 / ffn /
norm2 / fusion_gate.W_a / W_t``), built from stock ``torch.nn`` layers (``MultiheadAttention``, ``LayerNorm``,
``Linear``, ``GELU``), and fused span by span in a plain Python loop as ITH does. Only the test suite imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


class AudioMLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FusionGateUnit(nn.Module):
    def __init__(self, hidden_dim: int):
        super().__init__()
        self.W_a = nn.Linear(hidden_dim, hidden_dim)
        self.W_t = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, audio_states: torch.Tensor, text_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.W_a(audio_states) + self.W_t(text_states))
        return gate * audio_states + (1.0 - gate) * text_states, gate


class FusionLayer(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int, ff_dim: int, dropout: float, eps: float):
        super().__init__()
        self.mha = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden_dim, eps=eps)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, hidden_dim), nn.Dropout(dropout)
        )
        self.norm2 = nn.LayerNorm(hidden_dim, eps=eps)
        self.fusion_gate = FusionGateUnit(hidden_dim)

    def forward(self, text: torch.Tensor, audio: torch.Tensor, key_padding_mask: torch.Tensor):
        attended, _ = self.mha(text, audio, audio, key_padding_mask=key_padding_mask)
        out1 = self.norm1(text + attended)
        out2 = self.norm2(out1 + self.ffn(out1))
        return self.fusion_gate(out2, text)


class ReferenceFusion(nn.Module):
    """ITH's ``mlp`` + ``fusion_layer`` pair and its span loop."""

    def __init__(self, audio_dim: int, hidden_dim: int, num_heads: int, ff_dim: int, dropout: float, eps: float):
        super().__init__()
        self.mlp = AudioMLP(audio_dim, hidden_dim)
        self.fusion_layer = FusionLayer(hidden_dim, num_heads, ff_dim, dropout, eps)

    def fuse(self, hidden, audio_tokens, audio_mask, span_ranges, span_fused):
        """Same arguments as ``FusedMaskedLM.fuse`` (torch tensors; masks bool); returns (hidden, gate [B, L])."""
        fused = hidden.clone()
        gate_per_token = torch.zeros(hidden.shape[:2], dtype=hidden.dtype)
        for row in range(hidden.shape[0]):
            for slot in range(span_ranges.shape[1]):
                if not (span_fused[row, slot] and audio_mask[row, slot].any()):
                    continue
                start, end = (int(v) for v in span_ranges[row, slot])
                audio = self.mlp(audio_tokens[row, slot][None])
                out, gate = self.fusion_layer(hidden[row : row + 1, start:end], audio, ~audio_mask[row, slot][None])
                fused[row, start:end] = out[0]
                gate_per_token[row, start:end] = gate[0].mean(-1)
        return fused, gate_per_token


def torch_state_from_flax(params: Mapping) -> dict[str, np.ndarray]:
    """``ReferenceFusion`` state-dict names -> arrays, from the nnx pure dict of a ``FusedMaskedLM``'s params.

    Linear in both directions, so it also maps Flax gradients onto the names of the torch gradients.
    """
    projector, fusion = params["projector"], params["fusion"]
    state: dict[str, np.ndarray] = {}

    def linear(torch_name: str, flax_layer: Mapping) -> None:
        state[f"{torch_name}.weight"] = np.asarray(flax_layer["kernel"]).T
        state[f"{torch_name}.bias"] = np.asarray(flax_layer["bias"])

    def norm(torch_name: str, flax_layer: Mapping) -> None:
        state[f"{torch_name}.weight"] = np.asarray(flax_layer["scale"])
        state[f"{torch_name}.bias"] = np.asarray(flax_layer["bias"])

    linear("mlp.net.0", projector["input"])
    linear("mlp.net.2", projector["output"])
    qkv = [fusion[name] for name in ("query", "key", "value")]
    state["fusion_layer.mha.in_proj_weight"] = np.concatenate([np.asarray(p["kernel"]).T for p in qkv])
    state["fusion_layer.mha.in_proj_bias"] = np.concatenate([np.asarray(p["bias"]) for p in qkv])
    linear("fusion_layer.mha.out_proj", fusion["attention_output"])
    norm("fusion_layer.norm1", fusion["attention_layer_norm"])
    linear("fusion_layer.ffn.0", fusion["intermediate"])
    linear("fusion_layer.ffn.2", fusion["output"])
    norm("fusion_layer.norm2", fusion["output_layer_norm"])
    linear("fusion_layer.fusion_gate.W_a", fusion["gate_audio"])
    linear("fusion_layer.fusion_gate.W_t", fusion["gate_text"])
    return state


def load_flax_params(reference: ReferenceFusion, params: Mapping) -> ReferenceFusion:
    state = {name: torch.tensor(value) for name, value in torch_state_from_flax(params).items()}
    reference.load_state_dict(state, strict=True)
    return reference
