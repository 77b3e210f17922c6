"""Memory of the trained-AST training step (``audio.encoder=ast_trainable``), from XLA's own buffer assignment.

    python benchmarks/ast_step_memory.py                                    # bert-base + full AST, batch 32, CPU
    python benchmarks/ast_step_memory.py --device gpu --batches 32,64       # the same on a GPU backend
    python benchmarks/ast_step_memory.py --sizes minilm --batches 2

The step is the trainer's (``ith_jax.trainer.make_train_step``: AdamW, gradient clipping) on ``FusedMaskedLM``
with ``AstAudioEncoder`` over the paper's AST (``../shared/model_configs/ast_audioset.json``, all 1214 tokens per
clip: ``num_tokens=0``, ITH's keys and values), S=2 span slots per example (pitch), random weights. Each
variant (remat off/on x float32/bfloat16 compute) is lowered and compiled but not run, so a CPU answers for
batch sizes it could never train: ``compiled.memory_analysis()`` reports the bytes XLA assigned to arguments
(parameters, optimizer state, the batch), outputs and temporaries (activations kept for the backward pass,
workspace). The state is donated, as in training, so its output aliases its input. The peak is
arguments + temporaries + outputs not aliased. XLA's GPU backend fuses differently from its CPU backend, so
the CPU figure is an estimate of the GPU one; ``--device gpu`` measures it on the card.

XLA:CPU's buffer assignment does not honour rematerialisation (measured here: a 12-layer ``jax.checkpoint``
chain reports the same temporaries with and without it), so on a CPU the remat rows are derived instead:
the step compiled with a 1-block AST gives the working set of one block's forward and backward plus everything
else; each further block under remat keeps only its input (``[clips, 1214, 768]`` float32, the residual
stream) until the backward pass recomputes it. Those rows say "estimate"; on a GPU every row is measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ith_common.errors import UserError, run_main  # noqa: E402
from fusion_train_step import MODEL_CONFIGS, ast_config_values, machine_name  # noqa: E402
from mlm_train_step import COMMON, SIZES  # noqa: E402

GIB = 2**30


def step_memory(size: str, batch: int, *, remat: bool, dtype_name: str, spans: int, seq_len: int, masks: int,
                model_configs: Path, ast_layers: int | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ith_jax import trainer
    from ith_jax.models.ast import AstAudioEncoder, AstConfig, AstModel
    from ith_jax.models.bert import BertConfig, BertForMaskedLM
    from ith_jax.models.fusion import FusionConfig, build_fused_mlm

    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    ast_config = AstConfig.from_hf_config(ast_config_values(model_configs), source="ast_audioset.json")
    if ast_layers is not None:
        ast_config = AstConfig.from_dict({**ast_config.to_dict(), "num_hidden_layers": ast_layers})

    def build():
        mlm = BertForMaskedLM(BertConfig(**SIZES[size], **COMMON), dtype=dtype, rngs=nnx.Rngs(0))
        encoder = AstAudioEncoder(AstModel(ast_config, dtype=dtype, remat=remat, rngs=nnx.Rngs(2)), num_tokens=0)
        return build_fused_mlm(mlm, FusionConfig(audio_dim=ast_config.hidden_size), rngs=nnx.Rngs(1),
                               audio_encoder=encoder)

    graphdef, params, rest = trainer.split_model(nnx.eval_shape(build))  # shapes only: nothing is allocated
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.01))

    def loss_fn(model, batch, rng):
        logits = model(batch["input_ids"], batch["attention_mask"], audio_tokens=batch["features"],
                       audio_mask=batch["frames"], span_ranges=batch["span_ranges"], span_mask=batch["span_mask"],
                       span_has_audio=batch["span_mask"], positions=batch["positions"], deterministic=False,
                       rngs=nnx.Rngs(dropout=rng))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), {}

    shape = jax.ShapeDtypeStruct
    batch_shapes = {
        "input_ids": shape((batch, seq_len), jnp.int32), "attention_mask": shape((batch, seq_len), jnp.int32),
        "features": shape((batch, spans, ast_config.max_length, ast_config.num_mel_bins), jnp.float16),
        "frames": shape((batch, spans, ast_config.max_length), jnp.bool_),
        "span_ranges": shape((batch, spans, 2), jnp.int32), "span_mask": shape((batch, spans), jnp.int32),
        "positions": shape((batch, masks), jnp.int32), "labels": shape((batch, masks), jnp.int32),
    }
    state_shapes = jax.eval_shape(lambda p: trainer.init_train_state(p, optimizer), params)
    step = jax.jit(trainer.make_train_step(graphdef, rest, optimizer, loss_fn), donate_argnums=(0,))
    compiled = step.lower(state_shapes, batch_shapes, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        raise UserError(f"the {jax.default_backend()} backend reports no memory analysis")
    arguments, outputs = stats.argument_size_in_bytes, stats.output_size_in_bytes
    temporaries, aliased = stats.temp_size_in_bytes, stats.alias_size_in_bytes
    return {"size": size, "batch": batch, "remat": remat, "dtype": dtype_name,
            "parameters_m": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) / 1e6,
            "arguments_gib": arguments / GIB, "temporaries_gib": temporaries / GIB,
            "peak_gib": (arguments + temporaries + outputs - aliased) / GIB, "estimate": False,
            "layer_input_gib": batch * spans * ast_config.num_tokens * ast_config.hidden_size * 4 / GIB,
            "ast_layers": ast_config.num_hidden_layers}


def remat_estimate(settings: dict, full: dict) -> dict:
    """The remat row on a backend that ignores remat (see the module docstring): one block measured, the other
    blocks' saved inputs added, and the full model's parameter and optimizer bytes."""
    one = step_memory(**settings, remat=False, ast_layers=1)
    further = full["ast_layers"] - 1
    arguments_extra = full["arguments_gib"] - one["arguments_gib"]  # the other blocks' weights and Adam moments
    return {**full, "remat": True, "estimate": True,
            "temporaries_gib": one["temporaries_gib"] + further * one["layer_input_gib"],
            "peak_gib": one["peak_gib"] + arguments_extra + further * one["layer_input_gib"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--sizes", default="bert-base")
    parser.add_argument("--batches", default="32")
    parser.add_argument("--spans", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--masks", type=int, default=7)
    parser.add_argument("--model-configs", type=Path, default=MODEL_CONFIGS)
    args = parser.parse_args(argv)
    import os
    os.environ.setdefault("JAX_PLATFORMS", args.device if args.device == "cpu" else "cuda")
    import jax

    sizes = [s for s in args.sizes.split(",") if s]
    for size in sizes:
        if size not in SIZES:
            raise UserError(f"--sizes: unknown size {size!r}; expected some of {list(SIZES)}")
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        raise UserError(f"--batches {args.batches!r}: expected comma-separated integers") from None
    print(f"machine: {machine_name('cuda' if args.device == 'gpu' else 'cpu')}; backend {jax.default_backend()}; "
          f"jax {jax.__version__}")
    print(f"command: python benchmarks/ast_step_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print("| size | batch | AST remat | compute dtype | params (M) | arguments (GiB) | temporaries (GiB) | "
          "peak (GiB) |\n|---|---|---|---|---|---|---|---|", flush=True)
    for size in sizes:
        for batch in batches:
            for dtype_name in ("float32", "bfloat16"):
                settings = dict(size=size, batch=batch, dtype_name=dtype_name, spans=args.spans,
                                seq_len=args.seq_len, masks=args.masks, model_configs=args.model_configs)
                full = step_memory(**settings, remat=False)
                rows = [full, remat_estimate(settings, full) if jax.default_backend() == "cpu" else
                        step_memory(**settings, remat=True)]
                for row in rows:
                    print(f"| {size} | {batch} | {'on' if row['remat'] else 'off'} | {dtype_name} | "
                          f"{row['parameters_m']:.1f} | {row['arguments_gib']:.2f} | {row['temporaries_gib']:.2f} | "
                          f"{row['peak_gib']:.2f}{' (estimate)' if row['estimate'] else ''} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
