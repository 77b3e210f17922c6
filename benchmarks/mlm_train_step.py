"""Masked-LM training-step throughput on CPU: ith-jax vs Hugging Face PyTorch ``BertForMaskedLM``.

    python benchmarks/mlm_train_step.py            # full run (about 10 minutes on 2 cores)
    python benchmarks/mlm_train_step.py --quick    # fewer timed runs
    python benchmarks/mlm_train_step.py --sizes minilm --frameworks jax,torch-eager

Both sides train the same random-init model with the same step: batch 32 x 48 tokens, dropout on, AdamW
(lr 1e-4, weight decay 0.01, no clipping), cross-entropy at ``--masks`` masked positions per example only.
The MLM head runs only at those positions on both sides: ith-jax passes ``positions`` to
``BertForMaskedLM``; the torch side runs ``model.bert``, gathers the masked rows with the same index tensor
and applies ``model.cls`` to them (Hugging Face's own forward would project all 48 x 32 tokens onto the
vocabulary). The jax step is ``ith_jax.trainer.make_train_step`` (the trainer's jitted step).

Every measurement runs in its own subprocess so that torch's OpenMP threads and XLA's thread pool never
compete. Throughput is examples/s, the median over timed runs after warm-up. Model FLOP/s counts
6 x non-embedding encoder parameters x tokens, plus attention scores (12 x layers x L x H per token), plus
the head at masked positions (6 x (H^2 + H x V) each); the machine's fp32 peak is the best of a large
matmul in jax and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    "minilm": dict(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),
    # /work/shared/model_configs/bert_base_uncased.json
    "bert-base": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
}
COMMON = dict(
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)
# torch-eager and torch-compile use torch's fused AdamW (its fastest on CPU); torch-eager-default keeps
# torch.optim.AdamW's default per-parameter loop, which is what AdamW() gives without flags.
FRAMEWORKS = ("jax", "torch-eager", "torch-eager-default", "torch-compile")
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01


def model_flops_per_step(size: str, batch: int, seq_len: int, masks: int) -> float:
    shape = SIZES[size]
    hidden, inter, layers, vocab = (
        shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    )
    per_layer_params = 4 * hidden * hidden + 2 * hidden * inter  # attention + feed-forward matrices
    tokens = batch * seq_len
    encoder = 6 * layers * per_layer_params * tokens
    attention = 12 * layers * seq_len * hidden * tokens
    head = 6 * (hidden * hidden + hidden * vocab) * batch * masks
    return float(encoder + attention + head)


def synthetic_batch(batch: int, seq_len: int, masks: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1000, vocab, size=(batch, seq_len), dtype=np.int64)
    positions = np.stack([rng.choice(np.arange(1, seq_len), size=masks, replace=False) for _ in range(batch)])
    labels = np.take_along_axis(input_ids, positions, axis=1)
    np.put_along_axis(input_ids, positions, 103, axis=1)  # [MASK]
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones((batch, seq_len), np.int64),
        "token_type_ids": np.zeros((batch, seq_len), np.int64),
        "mask_positions": positions.astype(np.int64),
        "mask_label_ids": labels,
    }


def time_steps(step, *, warmup: int, runs: int, steps_per_run: int, batch: int) -> dict:
    """Calls ``step()`` (which must block until done) warmup times, then times ``runs`` runs of steps."""
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - started
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(steps_per_run):
            step()
        rates.append(batch * steps_per_run / (time.perf_counter() - started))
    return {"examples_per_s": statistics.median(rates), "runs": rates, "warmup_s": warmup_s}


# ---------------------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# ---------------------------------------------------------------------------------------------------------


def worker_jax(size: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ith_jax import trainer as train
    from ith_jax.models.bert import BertConfig, BertForMaskedLM

    config = BertConfig(**SIZES[size], **COMMON)
    model = BertForMaskedLM(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = train.split_model(model)
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def loss_fn(model, batch, rng):
        logits = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            positions=batch["mask_positions"],
            deterministic=False,
            rngs=nnx.Rngs(dropout=rng),
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["mask_label_ids"]).mean()
        return loss, {}

    step_fn = jax.jit(train.make_train_step(graphdef, rest, optimizer, loss_fn), donate_argnums=(0,))
    state = train.init_train_state(params, optimizer)
    batch = {
        key: jnp.asarray(value, jnp.int32)
        for key, value in synthetic_batch(args.batch, args.seq_len, args.masks, config.vocab_size).items()
    }
    holder = {"state": state, "step": 0}

    def step():
        rng = jax.random.fold_in(jax.random.key(0), holder["step"])
        holder["state"], metrics = step_fn(holder["state"], batch, rng)
        holder["step"] += 1
        jax.block_until_ready(metrics["loss"])

    result = time_steps(step, warmup=args.warmup, runs=args.runs, steps_per_run=args.steps_per_run, batch=args.batch)
    result["version"] = f"jax {jax.__version__}"
    return result


def worker_torch(size: str, args, *, compiled: bool, fused_adamw: bool) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(**SIZES[size], **COMMON)
    # sdpa is transformers' default attention on CPU.
    model = transformers.BertForMaskedLM(config).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=True if fused_adamw else None
    )
    batch = {
        key: torch.from_numpy(value)
        for key, value in synthetic_batch(args.batch, args.seq_len, args.masks, config.vocab_size).items()
    }
    hidden_size = config.hidden_size

    def loss_fn(input_ids, attention_mask, token_type_ids, mask_positions, mask_label_ids):
        hidden = model.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        index = mask_positions.unsqueeze(-1).expand(-1, -1, hidden_size)
        logits = model.cls(torch.gather(hidden, 1, index))  # the head at the masked rows only
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), mask_label_ids.flatten())

    forward = torch.compile(loss_fn) if compiled else loss_fn

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = forward(**batch)
        loss.backward()
        optimizer.step()
        loss.item()

    result = time_steps(step, warmup=args.warmup, runs=args.runs, steps_per_run=args.steps_per_run, batch=args.batch)
    result["version"] = f"torch {torch.__version__}, transformers {transformers.__version__}"
    result["threads"] = torch.get_num_threads()
    return result


def worker_peak(framework: str, args) -> dict:
    """fp32 GFLOP/s of a 4096^3 matmul (the best of several), as the machine's practical peak."""
    n = 4096
    flops = 2 * n**3
    times = []
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        matmul = jax.jit(jnp.matmul)
        matmul(a, b).block_until_ready()
        for _ in range(args.peak_runs):
            started = time.perf_counter()
            matmul(a, b).block_until_ready()
            times.append(time.perf_counter() - started)
    else:
        import torch

        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        for _ in range(args.peak_runs):
            started = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - started)
    return {"gflops": flops / min(times) / 1e9}


def run_worker(args) -> None:
    kind, _, size = args.worker.partition(":")
    if kind.startswith("peak-"):
        result = worker_peak(kind.removeprefix("peak-"), args)
    elif kind == "jax":
        result = worker_jax(size, args)
    else:
        result = worker_torch(
            size, args, compiled=kind == "torch-compile", fused_adamw=kind != "torch-eager-default"
        )
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------


def _busy_cpu_seconds() -> float | None:
    """CPU seconds spent by the whole machine so far (all processes), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until_idle(max_wait_s: float, threshold_cores: float = 0.15) -> float | None:
    """Waits (up to max_wait_s) until other processes use under threshold_cores; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = _busy_cpu_seconds()
        time.sleep(2.0)
        after = _busy_cpu_seconds()
        if before is None or after is None:
            return None
        used = (after - before) / 2.0
        if used < threshold_cores or time.monotonic() >= deadline:
            return used


def run_measurement(command: list[str], *, wait_idle_s: float, timeout_s: float, env: dict | None = None) -> dict:
    """Runs one measurement worker in a fresh interpreter and parses its ``RESULT {json}`` line; adds the wall
    time and how much CPU other processes used meanwhile (benchmarks/fusion_train_step.py uses it too)."""
    idle_before = wait_until_idle(wait_idle_s) if wait_idle_s > 0 else None
    started, machine_before, ours_before = time.perf_counter(), _busy_cpu_seconds(), _children_cpu_seconds()
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - started
    machine_after, ours_after = _busy_cpu_seconds(), _children_cpu_seconds()
    for line in finished.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
            result.update(wall_s=wall, other_cores_before=idle_before)
            if machine_before is not None and machine_after is not None:
                # CPU the rest of the machine used while the worker ran, in cores (0 = we had it to ourselves).
                others = (machine_after - machine_before) - (ours_after - ours_before)
                result["other_cores"] = max(others, 0.0) / wall
            return result
    tail = (finished.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {finished.returncode}: {tail[:300]}"}


def spawn(worker: str, args, timeout_s: float) -> dict:
    """One measurement of this script's ``--worker`` in a fresh interpreter."""
    command = [
        sys.executable, __file__, "--worker", worker,
        "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--masks", str(args.masks),
        "--warmup", str(args.warmup), "--runs", str(args.runs), "--steps-per-run", str(args.steps_per_run),
        "--peak-runs", str(args.peak_runs),
    ]  # fmt: skip
    return run_measurement(command, wait_idle_s=args.wait_idle, timeout_s=timeout_s)


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 timed runs of 1 step each, 3 peak runs")
    parser.add_argument("--sizes", default="minilm,bert-base")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--masks", type=int, default=7, help="masked positions per example (15%% of 48)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation included)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps-per-run", type=int, default=2)
    parser.add_argument("--peak-runs", type=int, default=5)
    parser.add_argument("--compile-timeout", type=float, default=300.0, help="seconds for a torch-compile worker")
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, metavar="SECONDS",
        help="before each measurement, wait up to this long for other processes to go idle (shared machines)",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.runs, args.steps_per_run, args.peak_runs = 5, 1, 3
    if args.worker:
        run_worker(args)
        return 0

    sizes = [s for s in args.sizes.split(",") if s]
    frameworks = [f for f in args.frameworks.split(",") if f]
    for name in sizes:
        if name not in SIZES:
            parser.error(f"--sizes: unknown size {name!r}; expected some of {sorted(SIZES)}")
    for name in frameworks:
        if name not in FRAMEWORKS:
            parser.error(f"--frameworks: unknown framework {name!r}; expected some of {list(FRAMEWORKS)}")

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
          f"{load_average()}", flush=True)
    peaks = {fw: spawn(f"peak-{fw}", args, 300) for fw in ("jax", "torch")}
    peak = max(result.get("gflops", 0.0) for result in peaks.values())
    print("fp32 matmul 4096^3: " + ", ".join(
        f"{fw} {result['gflops']:.0f} GFLOP/s" if "gflops" in result else f"{fw} {result['error']}"
        for fw, result in peaks.items()), flush=True)

    rows = []
    for size in sizes:
        flops = model_flops_per_step(size, args.batch, args.seq_len, args.masks)
        for framework in frameworks:
            timeout = args.compile_timeout if framework == "torch-compile" else 600
            result = spawn(f"{framework}:{size}", args, timeout)
            row = {"size": size, "framework": framework, **result}
            if "error" not in result:
                row["gflops"] = flops * result["examples_per_s"] / args.batch / 1e9
                print(f"{size:<10} {framework:<20} {result['examples_per_s']:7.2f} ex/s  {row['gflops']:6.1f} GFLOP/s "
                      f"(warm-up {result['warmup_s']:.0f} s; runs {', '.join(f'{r:.1f}' for r in result['runs'])}; "
                      f"other processes {result.get('other_cores', float('nan')):.2f} cores)", flush=True)
            else:
                print(f"{size:<10} {framework:<20} {result['error']}", flush=True)
            rows.append(row)

    print(f"\nload average after: {load_average()}")
    print(f"batch {args.batch} x {args.seq_len} tokens, {args.masks} masks/example; examples/s = median of "
          f"{args.runs} runs x {args.steps_per_run} steps; fp32 matmul peak {peak:.0f} GFLOP/s\n")
    print("| size | framework | examples/s (median) | best run | model GFLOP/s | % of peak | vs torch eager "
          "| other load (cores) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['size']} | {row['framework']} | - | - | - | - | {row['error']} | - |")
            continue
        baseline = next((r for r in rows if r["size"] == row["size"] and r["framework"] == "torch-eager"
                         and "error" not in r), None)
        ratio = f"{row['examples_per_s'] / baseline['examples_per_s']:.2f}x" if baseline else "-"
        print(f"| {row['size']} | {row['framework']} | {row['examples_per_s']:.1f} | {max(row['runs']):.1f} "
              f"| {row['gflops']:.0f} | {100 * row['gflops'] / peak:.0f}% | {ratio} "
              f"| {row.get('other_cores', float('nan')):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
