"""Fusion-LM training-step throughput: ith-jax against (a) PyTorch and (b) ITH's per-step AST work.

    python benchmarks/fusion_train_step.py --wait-idle 120        # CPU: MiniLM and bert-base (~20 min idle)
    python benchmarks/fusion_train_step.py --quick                # CPU smoke test: MiniLM, short runs (~6 min)
    python benchmarks/fusion_train_step.py --device cuda          # GPU: bert-base bf16, batch 32 and 256
    python benchmarks/fusion_train_step.py --sizes minilm --frameworks jax,torch-eager --out fusion.json
    python benchmarks/fusion_train_step.py --sizes minilm --frameworks jax-ast,ith     # the trained AST, CPU
    python benchmarks/fusion_train_step.py --device cuda --frameworks jax-ast,ith --ith-batch 32   # the same, GPU

The model is ITH's audio-fused masked LM (``ith_jax.models.fusion``): BERT, ITH's projector (Linear, ReLU,
Linear) on the audio tokens, ITH's fusion layer (cross-attention of each span's tokens to its audio, add & norm,
GELU FFN, add & norm, sigmoid gate) after layer 0 (``fusion_layer=0``, ITH's default), the MLM head at the
masked positions. Shapes: batch 32 x 48 tokens, 7 masked positions per example (as ``mlm_train_step.py``), the
pitch task's S=2 spans per example (animal sentences have 1) of 5-9 tokens each, T=16 cached audio tokens of
D_audio=768 per span (float16, as the cache stores them). Every row trains with AdamW (lr 1e-4, weight decay
0.01, no clipping), dropout 0.1 on, random init, all parameters trained.

Rows (``--frameworks``):
- ``jax``: ``build_fused_mlm`` around ``BertForMaskedLM`` (its vectorised fusion runs on all 48 tokens and
  keeps the span tokens' results); the step is the trainer's own ``ith_jax.trainer.make_train_step``, jitted
  with the state donated.
- ``torch-eager`` (a): Hugging Face ``BertForMaskedLM`` with the fusion modules of
  ``tests/torch_fusion_reference.py`` (``AudioMLP``, ``FusionLayer``) applied through a forward hook on the
  embeddings (layer k=0), span slot by span slot as ITH batches them (each slot's spans gathered into one padded
  ``[B, max span length, H]`` query block, one fusion call per slot); torch's fused AdamW.
- ``torch-compile`` (a): the same with ``torch.compile`` of forward and loss (inductor).
- ``torch-eager-loop`` (not run by default; CPU only): ``ReferenceFusion.fuse`` itself in the hook, the test
  suite's reference with its Python loop over every example and span.
- ``ith`` (b): ITH's per-step work: the AST encoder (``transformers.ASTModel``, random weights, the config of
  MIT/ast-finetuned-audioset from ``../shared/model_configs/ast_audioset.json``) runs forward and backward on
  every clip (S=2 clips of 1024 frames x 128 mel bins per example) inside the step, its 1214 tokens x 768 per
  clip go through the projector into the fusion layer, then the same BERT as (a); AdamW trains AST too, as ITH
  does. Where ITH's step does more, the row does what (a) does: the head at the masked positions only (ITH
  projects every token onto the vocabulary), no gradient clipping (ITH clips at 1.0), one AST call over both
  slots (ITH makes one per slot); so it is a lower bound on ITH's step. It is very slow on a CPU, so it runs
  ``--ith-batch`` examples per step (2; 1 with ``--quick``) and few timed steps; examples/s is per example.
- ``jax-ast``: ith-jax's answer to (b), ``audio.encoder=ast_trainable``: the same step with the Flax AST
  (``ith_jax.models.ast``, the same config, random weights) inside ``FusedMaskedLM`` on the same cached
  features (float16 ``[B, S, 1024, 128]``, as the cache stores them), all 1214 tokens per clip as keys and
  values (``num_tokens=0``), AdamW over everything; ``--ast-remat`` adds gradient checkpointing. Same batch and
  timing as (b), and compared against it in "vs (b)".

"vs (a)" divides by the faster of torch-eager and torch-compile at the same size and batch, "vs (b)" by the
ith row of the same size. Every measurement runs in its own subprocess (torch's OpenMP threads and XLA's pool
never compete); examples/s is the median over timed runs after warm-up, with one device sync at the end of
each run (none per step, on both sides). Before timing, the torch worker checks its slot-batched fusion against
``ReferenceFusion.fuse`` on the benchmark batch (eval mode, fp32).

Model FLOPs (6 x weights x tokens for forward + backward, plus 12 x keys x H per query for attention):
the LM as in ``mlm_train_step.py``; the fusion counted on the span tokens only (query, output, FFN and the two
gate matrices) and on every audio token (projector, keys, values); for (b) also the AST encoder (patch
embedding + 12 layers over 1214 tokens per clip). "% of peak" is against the best large matmul of jax and
torch on the same machine (fp32 4096^3 on a CPU, bf16 8192^3 on a GPU); on a GPU also against the card's
spec-sheet dense bf16 peak where it is known (``--peak-tflops`` sets it).

GPU (``--device cuda``): jax needs its CUDA backend (``jax[cuda12]``), torch a CUDA build. Both sides compute in
bf16 with float32 parameters and optimizer state: ith-jax through the model's compute dtype, torch through
``torch.autocast(bfloat16)``. Defaults there: ``--sizes bert-base --batches 32,256``, frameworks jax,
torch-eager, torch-compile (add ``ith`` to time (b) on the card too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # ith_common, ith_jax and tests.torch_fusion_reference from this checkout

from ith_common.atomic import atomic_write_text, check_output_file  # noqa: E402
from ith_common.errors import UserError, run_main  # noqa: E402

# The text-only benchmark's model shapes, FLOP count, optimizer settings and idle-machine helpers.
from mlm_train_step import (  # noqa: E402
    COMMON,
    LEARNING_RATE,
    SIZES,
    WEIGHT_DECAY,
    load_average,
    model_flops_per_step,
    run_measurement,
    time_steps,
)

FRAMEWORKS = ("jax", "torch-eager", "torch-compile", "torch-eager-loop", "ith", "jax-ast")
AST_ROWS = ("ith", "jax-ast")  # the rows with the AST in the step: (b)'s batch, timing and FLOPs
DEFAULT_FRAMEWORKS = {"cpu": "jax,torch-eager,torch-compile,ith", "cuda": "jax,torch-eager,torch-compile"}
TORCH_A_ROWS = ("torch-eager", "torch-compile")  # the rows "vs (a)" compares against (the faster one)
MODEL_CONFIGS = REPO.parent / "shared" / "model_configs"
FUSION_LAYER = 0  # ITH's default --fusion_idx: fuse after the embeddings
SPAN_LENGTHS = (5, 10)  # [low, high) word pieces: AuditoryBench pitch spans ("sound of a tube train")
SPAN_GAP = 6  # tokens between the two spans: "typically has a [MASK] pitch than the"
# Dense bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s (no sparsity).
SPEC_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 70.0, "L4": 121.0}


# ---------------------------------------------------------------------------------------------------------
# Inputs and FLOPs
# ---------------------------------------------------------------------------------------------------------


def synthetic_fused_batch(batch: int, seq_len: int, masks: int, spans: int, audio_tokens: int, audio_dim: int,
                          vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of pitch-shaped examples: S spans of 5-9 tokens, masked positions outside them, all audio real."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1000, vocab, size=(batch, seq_len), dtype=np.int64)
    span_ranges = np.zeros((batch, spans, 2), np.int32)
    positions = np.zeros((batch, masks), np.int64)
    for row in range(batch):
        start = 2
        for slot in range(spans):
            length = int(rng.integers(*SPAN_LENGTHS))
            span_ranges[row, slot] = start, start + length
            start += length + SPAN_GAP
        covered = np.zeros(seq_len, bool)
        for begin, end in span_ranges[row]:
            covered[begin:end] = True
        free = np.flatnonzero(~covered[1:]) + 1  # never [CLS]
        if span_ranges[row, -1, 1] > seq_len or len(free) < masks:
            raise UserError(f"--seq-len {seq_len} is too short for {spans} spans of up to {SPAN_LENGTHS[1] - 1} "
                            f"tokens and --masks {masks} masked positions")
        positions[row] = np.sort(rng.choice(free, size=masks, replace=False))
    labels = np.take_along_axis(input_ids, positions, axis=1)
    np.put_along_axis(input_ids, positions, 103, axis=1)  # [MASK]
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones((batch, seq_len), np.int64),
        "token_type_ids": np.zeros((batch, seq_len), np.int64),
        "mask_positions": positions,
        "mask_label_ids": labels,
        "audio_tokens": rng.standard_normal((batch, spans, audio_tokens, audio_dim)).astype(np.float16),
        "audio_mask": np.ones((batch, spans, audio_tokens), bool),
        "span_ranges": span_ranges,
        "span_mask": np.ones((batch, spans), np.int32),
        "span_has_audio": np.ones((batch, spans), np.int32),
    }


def _layer_weights(hidden: int, inter: int) -> int:
    return 4 * hidden * hidden + 2 * hidden * inter  # attention (q, k, v, out) + feed-forward matrices


def fusion_flops(hidden: int, inter: int, audio_dim: int, span_tokens: int, audio_tokens: int,
                 keys_per_query: int) -> float:
    """Forward + backward of the projector and fusion layer: useful work only (span tokens, real audio)."""
    per_query = 4 * hidden * hidden + 2 * hidden * inter  # query, attention output, FFN, gate W_a and W_t
    per_audio_token = audio_dim * hidden + hidden * hidden + 2 * hidden * hidden  # projector, keys, values
    attention = 12 * keys_per_query * hidden * span_tokens
    return float(6 * per_query * span_tokens + 6 * per_audio_token * audio_tokens + attention)


def ast_config_values(model_configs: Path) -> dict:
    path = model_configs / "ast_audioset.json"
    try:
        values = dict(json.loads(path.read_text(encoding="utf-8"))["config.json"])
    except FileNotFoundError:
        raise UserError(f"{path} not found; expected the AST config (set --model-configs)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path}: expected JSON with a 'config.json' object ({error})") from None
    for key in ("architectures", "num_labels", "model_type", "torch_dtype", "transformers_version"):
        values.pop(key, None)  # the checkpoint's bookkeeping, not ASTConfig arguments
    return values


def ast_tokens_per_clip(ast: dict) -> int:
    frequency = (ast["num_mel_bins"] - ast["patch_size"]) // ast["frequency_stride"] + 1
    time_patches = (ast["max_length"] - ast["patch_size"]) // ast["time_stride"] + 1
    return frequency * time_patches + 2  # + [CLS] and distillation tokens


def ast_flops_per_clip(ast: dict) -> float:
    tokens, hidden = ast_tokens_per_clip(ast), ast["hidden_size"]
    patch_embedding = 6 * ast["patch_size"] ** 2 * hidden * (tokens - 2)
    layers = ast["num_hidden_layers"]
    encoder = 6 * layers * _layer_weights(hidden, ast["intermediate_size"]) * tokens
    attention = 12 * layers * tokens * hidden * tokens
    return float(patch_embedding + encoder + attention)


def span_tokens_in_batch(batch: int, args) -> int:
    """How many tokens the spans of the benchmark batch of this size cover (the batch depends on its size)."""
    ranges = synthetic_fused_batch(batch, args.seq_len, args.masks, args.spans, 1, 1,
                                   SIZES["minilm"]["vocab_size"])["span_ranges"]
    return int(np.sum(ranges[..., 1] - ranges[..., 0]))


def step_flops(framework: str, size: str, batch: int, args) -> float:
    """Model FLOPs of one training step of ``framework`` at ``batch`` examples."""
    shape = SIZES[size]
    span_tokens = span_tokens_in_batch(batch, args)
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    lm = model_flops_per_step(size, batch, args.seq_len, args.masks)
    if framework not in AST_ROWS:
        fusion = fusion_flops(hidden, inter, args.audio_dim, span_tokens,
                              batch * args.spans * args.audio_tokens, args.audio_tokens)
        return lm + fusion
    ast = ast_config_values(args.model_configs)
    clip_tokens = ast_tokens_per_clip(ast)
    fusion = fusion_flops(hidden, inter, ast["hidden_size"], span_tokens,
                          batch * args.spans * clip_tokens, clip_tokens)
    return lm + fusion + batch * args.spans * ast_flops_per_clip(ast)


def time_runs(step, sync, *, warmup: int, runs: int, steps_per_run: int, batch: int) -> dict:
    """``mlm_train_step.time_steps`` over whole runs: ``steps_per_run`` steps, then one ``sync()`` that waits for
    the device (never per step, so that neither side pays a host round trip per step on a GPU). The warm-up is
    ``warmup`` steps rounded up to whole runs."""

    def run() -> None:
        for _ in range(steps_per_run):
            step()
        sync()

    return time_steps(run, warmup=-(-warmup // steps_per_run), runs=runs, steps_per_run=1,
                      batch=batch * steps_per_run)


# ---------------------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# ---------------------------------------------------------------------------------------------------------


def worker_jax(size: str, settings: dict, *, with_ast: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ith_jax import trainer
    from ith_jax.models.ast import AstAudioEncoder, AstConfig, AstModel
    from ith_jax.models.bert import BertConfig, BertForMaskedLM
    from ith_jax.models.fusion import FusionConfig, build_fused_mlm

    if settings["device"] == "cuda" and jax.default_backend() != "gpu":
        raise UserError(f"--device cuda, but jax runs on {jax.default_backend()} (install jax[cuda12])")
    dtype = jnp.bfloat16 if settings["dtype"] == "bfloat16" else jnp.float32
    config = BertConfig(**SIZES[size], **COMMON)
    mlm = BertForMaskedLM(config, dtype=dtype, rngs=nnx.Rngs(0))
    audio_encoder = None
    if with_ast:  # (b)'s AST in the step: the checkpoint's config, every token as keys and values
        ast_config = AstConfig.from_hf_config(ast_config_values(Path(settings["model_configs"])),
                                              source="ast_audioset.json")
        audio_encoder = AstAudioEncoder(AstModel(ast_config, dtype=dtype, remat=settings["ast_remat"],
                                                 rngs=nnx.Rngs(2)), num_tokens=0)
    model = build_fused_mlm(mlm, FusionConfig(audio_dim=settings["audio_dim"], fusion_layer=FUSION_LAYER),
                            rngs=nnx.Rngs(1), audio_encoder=audio_encoder)
    graphdef, params, rest = trainer.split_model(model)
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def loss_fn(model, batch, rng):
        logits = model(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
            audio_tokens=batch["audio_tokens"], audio_mask=batch["audio_mask"], span_ranges=batch["span_ranges"],
            span_mask=batch["span_mask"], span_has_audio=batch["span_has_audio"],
            positions=batch["mask_positions"], deterministic=False, rngs=nnx.Rngs(dropout=rng),
        )  # fmt: skip
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["mask_label_ids"]).mean()
        return loss, {}

    step_fn = jax.jit(trainer.make_train_step(graphdef, rest, optimizer, loss_fn), donate_argnums=(0,))
    host = synthetic_fused_batch(settings["batch"], settings["seq_len"], settings["masks"], settings["spans"],
                                 settings["audio_tokens"], settings["audio_dim"], config.vocab_size)
    if with_ast:  # the cached filterbank features replace the cached tokens; every frame is audio
        frames, mel = ast_config.max_length, ast_config.num_mel_bins
        host["audio_tokens"] = np.random.default_rng(1).standard_normal(
            (settings["batch"], settings["spans"], frames, mel)).astype(np.float16)
        host["audio_mask"] = np.ones((settings["batch"], settings["spans"], frames), bool)
    batch = {key: jnp.asarray(value.astype(np.int32) if value.dtype == np.int64 else value)
             for key, value in host.items()}
    warmup_runs = -(-settings["warmup"] // settings["steps_per_run"])  # as time_runs rounds it
    total_steps = (warmup_runs + settings["runs"]) * settings["steps_per_run"]
    rngs = list(jax.random.split(jax.random.key(0), total_steps))  # drawn before timing: no per-step dispatch
    holder = {"state": trainer.init_train_state(params, optimizer), "metrics": None}

    def step():
        holder["state"], holder["metrics"] = step_fn(holder["state"], batch, rngs.pop())

    def sync():
        jax.block_until_ready((holder["state"], holder["metrics"]))
        if not np.isfinite(float(holder["metrics"]["loss"])):
            raise RuntimeError("the jax loss is not finite")

    result = time_runs(step, sync, warmup=settings["warmup"], runs=settings["runs"],
                       steps_per_run=settings["steps_per_run"], batch=settings["batch"])
    result["parameters"] = int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))
    result["version"] = f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind})"
    return result


def fuse_spans_by_slot(fusion_layer, hidden, audio, key_padding, gather_index):
    """ITH's per-slot fusion, with static shapes: for each span slot, every example's span tokens are gathered
    into one padded query block and fused against that slot's audio in a single call.

    ``hidden [B, L, H]``; ``audio [B, S, K, H]`` (projected); ``key_padding [B, S, K]`` (True = ignore);
    ``gather_index [B, S, M]``: the token positions of each span, padded with L, which points at an extra zero
    row. Padding rows and unfused slots read and write only that row, which is dropped at the end.
    """
    import torch

    batch, length, width = hidden.shape
    padded = torch.cat([hidden, hidden.new_zeros(batch, 1, width)], dim=1)
    for slot in range(audio.shape[1]):
        index = gather_index[:, slot, :, None].expand(-1, -1, width)
        queries = padded.gather(1, index)
        fused, _gate = fusion_layer(queries, audio[:, slot], key_padding[:, slot])
        padded = padded.scatter(1, index, fused.to(padded.dtype))
    return padded[:, :length]


def slot_gather_index(span_ranges: np.ndarray, span_fused: np.ndarray, audio_mask: np.ndarray,
                      length: int) -> tuple[np.ndarray, np.ndarray]:
    """(``gather_index [B, S, M]`` for ``fuse_spans_by_slot``, ``key_padding [B, S, T]``) from the batch arrays.
    M is the longest span of the batch, as ITH pads each slot's spans to theirs."""
    fused = span_fused.astype(bool) & audio_mask.any(axis=-1)
    lengths = np.where(fused, span_ranges[..., 1] - span_ranges[..., 0], 0)
    longest = max(int(lengths.max()), 1)
    offsets = np.arange(longest)
    index = span_ranges[..., :1] + offsets
    index = np.where(offsets < lengths[..., None], index, length).astype(np.int64)
    # A slot without audio is never written back; all-False padding keeps its (discarded) softmax finite, so no
    # NaN reaches the gradients through it.
    key_padding = ~audio_mask.astype(bool) & fused[..., None]
    return index, key_padding


def worker_torch(size: str, settings: dict, *, kind: str) -> dict:
    """(a) and (b): Hugging Face BERT + the reference fusion through a forward hook; (b) adds AST in the step."""
    import torch
    import transformers

    from tests.torch_fusion_reference import ReferenceFusion

    device = torch.device(settings["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch has no CUDA device")
    if kind == "torch-eager-loop" and device.type != "cpu":
        raise UserError("torch-eager-loop runs on the CPU only (ReferenceFusion.fuse allocates on the CPU)")
    bf16 = settings["dtype"] == "bfloat16"
    torch.manual_seed(0)
    config = transformers.BertConfig(**SIZES[size], **COMMON)
    lm = transformers.BertForMaskedLM(config).to(device).train()  # sdpa attention, transformers' default
    reference = ReferenceFusion(settings["audio_dim"], config.hidden_size, config.num_attention_heads,
                                config.intermediate_size, dropout=0.1, eps=1e-5)
    ast = None
    if kind == "ith":
        ast_values = ast_config_values(Path(settings["model_configs"]))
        if ast_values["hidden_size"] != settings["audio_dim"]:
            raise UserError(f"--audio-dim {settings['audio_dim']} differs from AST's hidden_size "
                            f"{ast_values['hidden_size']}")
        ast = transformers.ASTModel(transformers.ASTConfig(**ast_values)).to(device).train()

    host = synthetic_fused_batch(settings["batch"], settings["seq_len"], settings["masks"], settings["spans"],
                                 settings["audio_tokens"], settings["audio_dim"], config.vocab_size)
    span_fused = host["span_mask"].astype(bool) & host["span_has_audio"].astype(bool)
    gather_index, key_padding = slot_gather_index(host["span_ranges"], span_fused, host["audio_mask"],
                                                  settings["seq_len"])
    if kind == "ith":  # AST's 1214 tokens per clip replace the cached ones: nothing is padded
        clip_tokens = ast_tokens_per_clip(ast_values)
        key_padding = np.zeros((settings["batch"], settings["spans"], clip_tokens), bool)
        features = np.random.default_rng(1).standard_normal(
            (settings["batch"] * settings["spans"], ast_values["max_length"], ast_values["num_mel_bins"])
        ).astype(np.float32)  # normalised log-mel filterbanks, as ASTFeatureExtractor returns them
        host["audio_features"] = features
    tensors = {key: torch.from_numpy(value).to(device) for key, value in host.items()}
    tensors["gather_index"] = torch.from_numpy(gather_index).to(device)
    tensors["key_padding"] = torch.from_numpy(key_padding).to(device)
    hidden_size, spans = config.hidden_size, settings["spans"]
    context: dict = {}  # what the hook needs from the step that runs the LM

    def fuse_hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if kind == "torch-eager-loop":
            fused, _gate = reference.fuse(hidden, tensors["audio_tokens"].float(), tensors["audio_mask"],
                                          tensors["span_ranges"], torch.from_numpy(span_fused))
        else:
            fused = fuse_spans_by_slot(reference.fusion_layer, hidden, context["audio"], tensors["key_padding"],
                                       tensors["gather_index"])
        return (fused, *output[1:]) if isinstance(output, tuple) else fused

    target = lm.bert.embeddings if FUSION_LAYER == 0 else lm.bert.encoder.layer[FUSION_LAYER - 1]
    target.register_forward_hook(fuse_hook)

    if kind != "ith":
        _check_slot_fusion_against_reference(reference, host, span_fused, gather_index, key_padding)
    reference.to(device).train()
    parameters = [p for module in (lm, reference, ast) if module is not None for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=True)

    def loss_fn(input_ids, attention_mask, token_type_ids, mask_positions, mask_label_ids, audio_tokens,
                audio_features=None):
        if kind == "ith":  # the encoder inside the step, forward and backward, one call over both slots
            audio_tokens = ast(input_values=audio_features).last_hidden_state
            audio_tokens = audio_tokens.reshape(input_ids.shape[0], spans, *audio_tokens.shape[1:])
        if kind != "torch-eager-loop":  # (the loop projects each span's audio itself)
            context["audio"] = reference.mlp(audio_tokens.float())  # the cached float16, as the loader gives it
        hidden = lm.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        index = mask_positions.unsqueeze(-1).expand(-1, -1, hidden_size)
        logits = lm.cls(torch.gather(hidden, 1, index))  # the head at the masked rows only
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), mask_label_ids.flatten())

    forward = torch.compile(loss_fn) if kind == "torch-compile" else loss_fn
    inputs = {key: tensors[key] for key in ("input_ids", "attention_mask", "token_type_ids", "mask_positions",
                                            "mask_label_ids", "audio_tokens")}
    if kind == "ith":
        inputs["audio_features"] = tensors["audio_features"]
    holder = {"loss": None}

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(**inputs)
        loss.backward()
        optimizer.step()
        holder["loss"] = loss.detach()

    def sync():
        if not torch.isfinite(holder["loss"]).item():  # .item() waits for the device
            raise RuntimeError("the torch loss is not finite")

    result = time_runs(step, sync, warmup=settings["warmup"], runs=settings["runs"],
                       steps_per_run=settings["steps_per_run"], batch=settings["batch"])
    result["parameters"] = int(sum(p.numel() for p in parameters))
    result["version"] = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device.type == "cuda":
        result["version"] += f" ({torch.cuda.get_device_name()})"
    else:
        result["threads"] = torch.get_num_threads()
    return result


def _check_slot_fusion_against_reference(reference, host, span_fused, gather_index, key_padding) -> None:
    """The slot-batched fusion must compute what ``ReferenceFusion.fuse`` (the tested reference) computes.
    On the CPU in fp32 and eval mode, before the modules move to the device (the reference allocates on the CPU)."""
    import torch

    width = reference.fusion_layer.norm1.normalized_shape[0]
    hidden = torch.randn(*host["input_ids"].shape, width, generator=torch.Generator().manual_seed(2))
    audio = torch.from_numpy(host["audio_tokens"]).float()
    reference.eval()
    with torch.no_grad():
        expected, _ = reference.fuse(hidden, audio, torch.from_numpy(host["audio_mask"]),
                                     torch.from_numpy(host["span_ranges"]), torch.from_numpy(span_fused))
        ours = fuse_spans_by_slot(reference.fusion_layer, hidden, reference.mlp(audio),
                                  torch.from_numpy(key_padding), torch.from_numpy(gather_index))
    difference = float((ours - expected).abs().max())
    if not difference < 1e-4:
        raise RuntimeError(f"slot-batched fusion differs from ReferenceFusion.fuse by {difference:.3g}")


def worker_peak(framework: str, settings: dict) -> dict:
    """GFLOP/s of the best of several large square matmuls: the machine's practical peak for this dtype."""
    n = 8192 if settings["device"] == "cuda" else 4096
    bf16 = settings["dtype"] == "bfloat16"
    times = []
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        dtype = jnp.bfloat16 if bf16 else jnp.float32
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        matmul = jax.jit(jnp.matmul)
        run, sync = (lambda: matmul(a, b)), jax.block_until_ready
    else:
        import torch

        device = torch.device(settings["device"])
        dtype = torch.bfloat16 if bf16 else torch.float32
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        run = lambda: torch.matmul(a, b)  # noqa: E731
        sync = (lambda out: torch.cuda.synchronize()) if device.type == "cuda" else (lambda out: out)
    sync(run())
    for _ in range(settings["peak_runs"]):
        started = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - started)
    return {"gflops": 2 * n**3 / min(times) / 1e9}


def run_worker(kind: str, settings: dict) -> dict:
    framework, _, size = kind.partition(":")
    if framework.startswith("peak-"):
        return worker_peak(framework.removeprefix("peak-"), settings)
    if framework in ("jax", "jax-ast"):
        return worker_jax(size, settings, with_ast=framework == "jax-ast")
    return worker_torch(size, settings, kind=framework)


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------


def spawn(kind: str, settings: dict, args, timeout_s: float) -> dict:
    """One measurement of this script's ``--worker`` in a fresh interpreter (``mlm_train_step.run_measurement``)."""
    command = [sys.executable, __file__, "--worker", kind, "--worker-settings", json.dumps(settings)]
    environment = dict(os.environ)
    if settings["device"] == "cpu":
        environment["JAX_PLATFORMS"] = "cpu"  # a CUDA jaxlib on a CPU run would otherwise take the GPU
    return run_measurement(command, wait_idle_s=args.wait_idle, timeout_s=timeout_s, env=environment)


def machine_name(device: str) -> str:
    """``lscpu``'s model name (the CPU), plus the GPU's name for a CUDA run."""
    cpu = platform.processor() or platform.machine()
    try:
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=30).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in listing.splitlines()
                    if line.startswith("Model name:")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    name = f"{cpu}, {os.cpu_count()} CPUs"
    if device == "cuda":
        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, check=False, timeout=30).stdout.strip().splitlines()
            name += f"; GPU: {gpus[0] if gpus else 'unknown'}"
        except (OSError, subprocess.SubprocessError):
            name += "; GPU: nvidia-smi not available"
    return name


def spec_peak_tflops(machine: str, override: float | None) -> float | None:
    if override:
        return override
    gpu = machine.partition("GPU: ")[2]
    # Longest names first, so that "GH200" is not read as "H200".
    return next((tflops for name, tflops in sorted(SPEC_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0]))
                 if name in gpu), None)


def _split_list(text: str, allowed, option: str, parser) -> list[str]:
    values = [value for value in text.split(",") if value]
    for value in values:
        if value not in allowed:
            parser.error(f"{option}: unknown value {value!r}; expected some of {list(allowed)}")
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke test: MiniLM only (unless --sizes), 3 timed runs "
                        "of 1 step, (b) at 1 example x 2 runs, 3 peak runs")
    parser.add_argument("--sizes", help="default: minilm,bert-base (cpu; minilm with --quick), bert-base (cuda)")
    parser.add_argument("--frameworks", help=f"some of {','.join(FRAMEWORKS)}; default: {DEFAULT_FRAMEWORKS}")
    parser.add_argument("--batches", help="batch sizes of the jax and torch rows; default 32 (cpu), 32,256 (cuda)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default float32 (cpu), bfloat16 (cuda)")
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--masks", type=int, default=7, help="masked positions per example (15%% of 48)")
    parser.add_argument("--spans", type=int, default=2, help="span slots per example (pitch: 2, animal: 1)")
    parser.add_argument("--audio-tokens", type=int, default=16, help="cached audio tokens per span (T)")
    parser.add_argument("--audio-dim", type=int, default=768, help="cached audio token width (AST: 768)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, compilation included, rounded up to "
                        "whole runs (2 cpu, 10 cuda)")
    parser.add_argument("--runs", type=int, help="timed runs (5 cpu, 10 cuda)")
    parser.add_argument("--steps-per-run", type=int, help="steps per timed run (2 cpu, 20 cuda)")
    parser.add_argument("--ith-batch", type=int, help="examples per step of the (b) row (2; 1 with --quick)")
    parser.add_argument("--ith-warmup", type=int, default=1)
    parser.add_argument("--ith-runs", type=int, help="timed runs of the (b) row, 1 step each (3; 2 with --quick)")
    parser.add_argument("--ast-remat", action="store_true", help="jax-ast: gradient checkpointing over AST's blocks")
    parser.add_argument("--peak-runs", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 spec peak, if not in the table")
    parser.add_argument("--model-configs", type=Path, default=MODEL_CONFIGS,
                        help="folder holding ast_audioset.json (default: ../shared/model_configs)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement subprocess")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement, wait up to this long for other processes to go idle")
    parser.add_argument("--out", type=Path, help="also write every result as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    cuda = args.device == "cuda"
    default_sizes = "bert-base" if cuda else "minilm" if args.quick else "minilm,bert-base"
    args.sizes = _split_list(args.sizes or default_sizes, SIZES, "--sizes", parser)
    args.frameworks = _split_list(args.frameworks or DEFAULT_FRAMEWORKS[args.device], FRAMEWORKS, "--frameworks",
                                  parser)
    try:
        args.batches = [int(value) for value in (args.batches or ("32,256" if cuda else "32")).split(",") if value]
    except ValueError:
        parser.error(f"--batches {args.batches!r}: expected comma-separated integers")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    defaults = dict(warmup=(10, 2), runs=(10, 5), steps_per_run=(20, 2))
    for name, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if cuda else on_cpu)
    if args.quick:
        args.runs, args.steps_per_run, args.peak_runs = 3, 1, 3
    args.ith_batch = args.ith_batch or (1 if args.quick else 2)
    args.ith_runs = args.ith_runs or (2 if args.quick else 3)
    positive = dict(seq_len=args.seq_len, masks=args.masks, spans=args.spans, audio_tokens=args.audio_tokens,
                    audio_dim=args.audio_dim, runs=args.runs, steps_per_run=args.steps_per_run,
                    ith_batch=args.ith_batch, ith_runs=args.ith_runs, peak_runs=args.peak_runs)
    for name, value in positive.items():
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    if any(batch < 1 for batch in args.batches):
        parser.error(f"--batches {args.batches}: expected positive integers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker, json.loads(args.worker_settings))), flush=True)
        return 0
    if args.out:
        check_output_file(args.out, what="--out")  # before half an hour of measurements
    if set(AST_ROWS) & set(args.frameworks):
        ast_config_values(args.model_configs)  # a missing config fails now, not after the other rows
    span_tokens = span_tokens_in_batch(args.batches[0], args) / args.batches[0]  # per example, for the header

    base = dict(device=args.device, dtype=args.dtype, seq_len=args.seq_len, masks=args.masks, spans=args.spans,
                audio_tokens=args.audio_tokens, audio_dim=args.audio_dim, peak_runs=args.peak_runs,
                model_configs=str(args.model_configs), ast_remat=args.ast_remat)
    machine = machine_name(args.device)
    command = "python benchmarks/fusion_train_step.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"machine: {machine}; load average {load_average()}\ncommand: {command}", flush=True)
    peaks = {fw: spawn(f"peak-{fw}", base, args, 600) for fw in ("jax", "torch")}
    peak = max(result.get("gflops", 0.0) for result in peaks.values())
    print(f"{args.dtype} matmul peak: " + ", ".join(
        f"{fw} {result['gflops']:.0f} GFLOP/s" if "gflops" in result else f"{fw} {result['error']}"
        for fw, result in peaks.items()), flush=True)

    rows = []
    for size in args.sizes:
        for framework in args.frameworks:
            ith = framework in AST_ROWS
            for batch in [args.ith_batch] if ith else args.batches:
                timing = (dict(warmup=args.ith_warmup, runs=args.ith_runs, steps_per_run=1) if ith else
                          dict(warmup=args.warmup, runs=args.runs, steps_per_run=args.steps_per_run))
                result = spawn(f"{framework}:{size}", {**base, **timing, "batch": batch}, args, args.timeout)
                row = {"size": size, "framework": framework, "batch": batch, "timing": timing, **result}
                if "error" not in result:
                    flops = step_flops(framework, size, batch, args)
                    row["gflops"] = flops * result["examples_per_s"] / batch / 1e9
                    print(f"{size:<10} {framework:<17} batch {batch:<4} {result['examples_per_s']:9.3g} ex/s "
                          f"{row['gflops']:8.1f} GFLOP/s (warm-up {result['warmup_s']:.0f} s; runs "
                          f"{', '.join(f'{r:.3g}' for r in result['runs'])}; other processes "
                          f"{result.get('other_cores', float('nan')):.2f} cores)", flush=True)
                else:
                    print(f"{size:<10} {framework:<17} batch {batch:<4} {result['error']}", flush=True)
                rows.append(row)

    spec = spec_peak_tflops(machine, args.peak_tflops) if args.device == "cuda" else None
    table = format_table(rows, peak=peak, spec_tflops=spec)
    versions = sorted({row["version"] for row in rows if "version" in row})
    print(f"\nload average after: {load_average()}")
    print(f"machine: {machine}\ncommand: {command}\nsoftware: {'; '.join(versions)}")
    print(f"{args.dtype}; {args.seq_len} tokens, {args.masks} masks/example, S={args.spans} spans/example "
          f"({span_tokens:.1f} span tokens), T={args.audio_tokens} cached audio tokens x {args.audio_dim}; "
          f"examples/s = median of {args.runs} runs x {args.steps_per_run} steps after {args.warmup} warm-up "
          f"(ith: {args.ith_runs} runs x 1 step of {args.ith_batch} examples after {args.ith_warmup}); matmul peak "
          f"{peak:.0f} GFLOP/s" + (f"; spec peak {spec:.0f} TFLOP/s" if spec else "") + "\n")
    print(table)
    if args.out:
        report = dict(machine=machine, command=command, software=versions, peaks=peaks, spec_tflops=spec,
                      span_tokens_per_example=span_tokens, rows=rows, table=table)
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    return 0


def format_table(rows: list[dict], *, peak: float, spec_tflops: float | None) -> str:
    spec_column = spec_tflops is not None
    header = ("| size | batch | framework | examples/s (median) | best run | params (M) | model GFLOP/s | % of peak "
              + ("| % of spec peak " if spec_column else "") + "| vs (a) | vs (b) | other load (cores) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cells = [row["size"], str(row["batch"]), row["framework"]]
        if "error" in row:
            lines.append("| " + " | ".join(cells + [row["error"]] + ["-"] * (7 + spec_column)) + " |")
            continue

        def same(framework: str, row=row) -> list[dict]:  # (b) runs at its own batch: compared per example
            return [r for r in rows if "error" not in r and r["size"] == row["size"] and r["framework"] == framework
                    and (framework == "ith" or r["batch"] == row["batch"])]

        torch_a = max((r for name in TORCH_A_ROWS for r in same(name)), key=lambda r: r["examples_per_s"],
                      default=None)
        ith = next(iter(same("ith")), None)
        ratio = lambda base: f"{row['examples_per_s'] / base['examples_per_s']:.2f}x" if base else "-"  # noqa: E731
        cells += [f"{row['examples_per_s']:.3g}", f"{max(row['runs']):.3g}", f"{row['parameters'] / 1e6:.1f}",
                  f"{row['gflops']:.0f}", f"{100 * row['gflops'] / peak:.0f}%" if peak else "-"]
        if spec_column:
            cells.append(f"{100 * row['gflops'] / (spec_tflops * 1e3):.1f}%")
        cells += [ratio(torch_a) + (f" ({torch_a['framework']})" if torch_a else ""), ratio(ith),
                  f"{row.get('other_cores', float('nan')):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_main(main))
