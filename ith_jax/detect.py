"""Run the span detector over AuditoryBench files and write the span manifest for the audio sidecar.

    python -m ith_jax.detect --workdir DIR --data FILE [--data FILE ...] --out spans.jsonl [--step N]
    python -m ith_jax.detect --gold --data FILE [--data FILE ...] --out gold_spans.jsonl

One JSON record per sentence (schema: docs/manifest.md, validated by ``ith_common.manifest``, the module both
halves share): a stable id, the sentence, the detected spans with character offsets taken from the
tokenizer's offsets and a confidence, and the gold spans where the file has them. ``--gold`` writes the
same manifest from the gold spans without a model, for oracle-span experiments and for running the sidecar
before a detector is trained.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from ith_common import manifest as manifest_lib
from ith_jax.data import auditorybench, batching, spans
from ith_jax.data.records import EncodedExample
from ith_jax.data.tokenizer import tokenizer_info
from ith_common.atomic import check_output_file
from ith_common.errors import UserError, run_main

logger = logging.getLogger("ith_jax")


def gold_spans_of(example: auditorybench.Example) -> list[dict]:
    """The example's gold spans located in its sentence (case-insensitive); spans not found are left out."""
    found = []
    for char_span in auditorybench.find_spans(example.sentence, example.spans):
        if char_span is not None:
            start, end = char_span
            found.append({"text": example.sentence[start:end], "start": start, "end": end})
    return found


def make_record(example: auditorybench.Example, detected: list[dict], detector: str) -> dict:
    return {
        "schema_version": manifest_lib.SCHEMA_VERSION,
        "id": manifest_lib.expected_id(example.task, example.source, example.row),
        "task": example.task,
        "source": example.source,
        "row": example.row,
        "sentence": example.sentence,
        "spans": [{"text": s["text"], "start": s["start"], "end": s["end"], "confidence": s.get("confidence")}
                  for s in detected],
        "gold_spans": gold_spans_of(example) if example.spans else None,
        "detector": detector,
    }


def encode_for_detection(examples, tokenizer, max_length: int) -> list[EncodedExample]:
    """Tokenised sentences without labels. Over-long ones are cut to max_length (spans past the cut cannot
    be detected; AuditoryBench sentences are far shorter than 128 pieces)."""
    info = tokenizer_info(tokenizer)
    empty = np.zeros((0,), np.int32)
    rows = []
    for example, encoding in zip(examples, tokenizer.encode_batch([e.sentence for e in examples])):
        ids = np.asarray(encoding.ids, np.int32)
        offsets = np.asarray(encoding.offsets, np.int32).reshape(-1, 2)
        special = np.asarray(encoding.special_tokens_mask, np.int32)
        if len(ids) > max_length:
            ids = np.concatenate([ids[: max_length - 1], [info.sep_id]]).astype(np.int32)
            offsets = np.concatenate([offsets[: max_length - 1], [[0, 0]]]).astype(np.int32)
            special = np.concatenate([special[: max_length - 1], [1]]).astype(np.int32)
        rows.append(EncodedExample(
            input_ids=ids, offsets=offsets, special_mask=special, mask_positions=empty, mask_label_ids=empty,
            span_token_ranges=np.zeros((0, 2), np.int32), span_index=empty, sentence=example.sentence,
            example=example))
    return rows


def detect(workdir: Path, data_files: list[str], *, step: int | None = None, batch_size: int | None = None,
           progress: bool = True) -> tuple[list[dict], str]:
    import jax

    from ith_jax import mesh as mesh_lib
    from ith_jax import tasks as tasks_lib
    from ith_jax import trainer as trainer_lib

    config = trainer_lib.load_workdir_config(workdir)
    if config.head != "span":
        raise UserError(f"{workdir} holds a {config.head!r} model; detect needs a span detector "
                        "(trained with configs/span.py)")
    tokenizer = trainer_lib.load_workdir_tokenizer(workdir, config)
    task = tasks_lib.make_task(config, tokenizer)
    mesh = mesh_lib.make_data_mesh()
    batch_size = config.eval_batch_size if batch_size is None else batch_size
    mesh_lib.check_batch_size(batch_size, mesh, "--batch_size")
    model = trainer_lib.restore_for_inference(workdir, config, mesh, step=step)
    params = model.params
    predict_step = jax.jit(trainer_lib.make_predict_step(model.graphdef, model.rest, task.predict),
                           out_shardings=mesh_lib.batch_sharded(mesh))
    detector = f"{workdir.resolve()}@{model.step}"

    records = []
    cleaning = spans.SpanCleaningStats()  # whole-word decoding and dropped function-word spans, counted
    for path in data_files:
        examples = load_logged(path)
        detected = detect_examples(examples, tokenizer, predict_step, params, mesh, buckets=tuple(config.buckets),
                                   batch_size=batch_size, cleaning=cleaning, progress=progress,
                                   desc=Path(path).name)
        records.extend(make_record(example, found, detector) for example, found in zip(examples, detected))
    logger.info("span cleaning: %s", cleaning.summary())
    return records, detector


def detect_examples(examples: list[auditorybench.Example], tokenizer, predict_step, params, mesh, *,
                    buckets: tuple[int, ...], batch_size: int, cleaning: spans.SpanCleaningStats | None = None,
                    progress: bool = False, desc: str | None = None) -> list[list[dict]]:
    """The spans a restored detector (``predict_step`` of ``SpanTask.predict``) finds in each example's
    sentence, in order: what ``detect`` writes into a manifest and ``ith_jax.api`` hands to the fused LM."""
    from tqdm import tqdm

    from ith_jax import mesh as mesh_lib

    rows = encode_for_detection(examples, tokenizer, max(buckets))
    detected: dict[int, list[dict]] = {}
    batches = batching.iterate_batches(rows, batch_size=batch_size, buckets=buckets, max_masks=1)
    total = batching.num_batches(rows, batch_size=batch_size, buckets=buckets)
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress):
        indices = batch.pop("example_index")
        probs = mesh_lib.to_host(predict_step(params, mesh_lib.put_batch(batch, mesh)))["tag_probs"]
        for position, index in enumerate(indices):
            if index >= 0:
                row = rows[index]
                detected[int(index)] = spans.decode_spans(
                    probs[position][: row.length], row.offsets, row.sentence, row.special_mask,
                    stats=cleaning, gold_count=len(gold_spans_of(row.example)))
    return [detected[i] for i in range(len(rows))]


def load_logged(path: str) -> list[auditorybench.Example]:
    """The file's usable rows; the dropped ones (e.g. no [MASK]) are counted in the log, as training does."""
    examples, report = auditorybench.load_examples(path, None, strict=False)
    logger.info("%s: %s", path, report.summary())
    return examples


def gold_manifest(data_files: list[str]) -> list[dict]:
    records = []
    for path in data_files:
        for example in load_logged(path):
            records.append(make_record(example, gold_spans_of(example), "gold"))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ith_jax.detect", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="a span-detector workdir (configs/span.py)")
    parser.add_argument("--gold", action="store_true", help="write the gold spans; no model")
    parser.add_argument("--data", action="append", required=True, help="an AuditoryBench CSV (repeatable)")
    parser.add_argument("--out", required=True, help="the manifest to write (JSONL)")
    parser.add_argument("--step", type=int, default=None, help="a periodic checkpoint instead of the best")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's eval_batch_size")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    if args.gold == bool(args.workdir):
        parser.error("give exactly one of --workdir DIR and --gold")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: expected a positive integer")
    check_output_file(args.out, what="--out")  # before the detection, not after it
    if args.gold:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # --gold never imports jax
        records, detector = gold_manifest(args.data), "gold"
    else:
        from ith_jax import trainer as trainer_lib
        trainer_lib.setup_logging()
        records, detector = detect(Path(args.workdir), args.data, step=args.step, batch_size=args.batch_size,
                                   progress=not args.no_progress)
    manifest_lib.write_manifest(records, args.out)
    num_spans = sum(len(r["spans"]) for r in records)
    print(f"wrote {len(records)} records with {num_spans} spans ({detector}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
