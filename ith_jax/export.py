"""Export a trained workdir's text model as a Hugging Face ``BertForMaskedLM`` checkpoint (+ ITH's fusion weights).

    python -m ith_jax.export --workdir W --out DIR [--step N]

``DIR`` gets what ``transformers.BertForMaskedLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``
read: ``config.json`` (Hugging Face's BertConfig field names), ``model.safetensors`` (Hugging Face tensor names,
torch's ``[out, in]`` linear layout; the decoder is tied to the word embeddings, as transformers ties it on
load), ``tokenizer.json`` (the workdir's own copy), ``vocab.txt``, ``tokenizer_config.json`` and
``special_tokens_map.json``. An ITH workdir adds ``fusion.safetensors`` (the audio projector and fusion layer,
by their Flax path under ``FusedMaskedLM``, e.g. ``fusion.gate_audio.kernel``, in Flax's ``[in, out]`` layout)
and ``fusion_config.json`` (``FusionConfig.to_dict()``); ``ith_export.json`` says where it all came from. The
names come from ``ith_jax.models.convert``'s table (``hf_name_of``), the inverse of the import. Loading: see
docs/api.md.

Written without torch or transformers (``safetensors.numpy``), into a temporary directory that is renamed to
``DIR`` when complete; ``DIR`` must not exist or be empty.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from ith_common.atomic import check_output_dir, fsync_directory
from ith_common.errors import UserError, run_main
from ith_jax import mesh as mesh_lib
from ith_jax import trainer as trainer_lib
from ith_jax.data.tokenizer import tokenizer_info
from ith_jax.models import convert

MODEL_FILE = "model.safetensors"
FUSION_FILE = "fusion.safetensors"
FUSION_CONFIG_FILE = "fusion_config.json"
PROVENANCE_FILE = "ith_export.json"


def _flat(tree: dict) -> dict[tuple, np.ndarray]:
    """``{path: array}`` of a nested parameter dict; keys as they are (layer indices may be ints)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)] = np.asarray(leaf, np.float32)
    return out


def hf_state_dict(text_params: dict) -> dict[str, np.ndarray]:
    """A ``BertForMaskedLM`` parameter tree -> Hugging Face tensors (every parameter must have a name)."""
    out = {}
    for path, array in _flat(text_params).items():
        named = convert.hf_name_of(path)
        if named is None:
            raise UserError(f"parameter {'.'.join(map(str, path))} has no Hugging Face name; expected a "
                            "BertForMaskedLM")
        name, transpose = named
        out[name] = np.ascontiguousarray(array.T if transpose else array)
    return out


def _tokenizer_files(tokenizer, out: Path, max_length: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise UserError("the workdir's tokenizer.json has gaps in its vocabulary ids; expected ids 0..N-1")
    (out / "vocab.txt").write_text("".join(token + "\n" for token, _ in by_id), encoding="utf-8")
    normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
    info = tokenizer_info(tokenizer)
    special = {name: tokenizer.id_to_token(getattr(info, f"{name}_id")) for name in ("unk", "sep", "pad", "cls",
                                                                                   "mask")}
    special_map = {f"{name}_token": token for name, token in special.items()}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": bool(normalizer.get("lowercase", True)),
        "model_max_length": max_length, **special_map}, indent=2), encoding="utf-8")


def export_workdir(workdir: Path, out: Path, *, step: int | None = None) -> dict:
    """Writes the export (see the module docstring) and returns what ``ith_export.json`` holds."""
    from safetensors.numpy import save_file

    out = Path(out)
    check_output_dir(out, what="--out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; expected a new or empty directory")
    config = trainer_lib.load_workdir_config(workdir)
    if config.head != "mlm":
        raise UserError(f"{workdir} holds a {config.head!r} model; export writes masked-LM workdirs "
                        "(configs/lm.py) as BertForMaskedLM")
    tokenizer = trainer_lib.load_workdir_tokenizer(workdir, config)
    model = trainer_lib.restore_for_inference(workdir, config, mesh_lib.make_data_mesh(), step=step)
    params = jax.device_get(model.params)
    fused = model.spec.fusion is not None
    bert = dict(model.spec.bert)
    provenance = {"workdir": str(Path(workdir).resolve()), "step": model.step, "kind": "ith" if fused else "text",
                  "model_spec": model.spec.to_dict(), "files": [MODEL_FILE, "config.json", "tokenizer.json",
                                                                "vocab.txt", "tokenizer_config.json",
                                                                "special_tokens_map.json"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(hf_state_dict(params["mlm"] if fused else params), str(staging / MODEL_FILE),
                  metadata={"format": "pt"})
        hf_config = {"architectures": ["BertForMaskedLM"], "model_type": "bert", **bert}
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
        _tokenizer_files(tokenizer, staging, int(bert["max_position_embeddings"]))
        if fused:
            fusion = {".".join(map(str, path)): np.ascontiguousarray(array)
                      for path, array in _flat({k: v for k, v in params.items() if k != "mlm"}).items()}
            save_file(fusion, str(staging / FUSION_FILE))
            (staging / FUSION_CONFIG_FILE).write_text(json.dumps(dict(model.spec.fusion), indent=2),
                                                      encoding="utf-8")
            provenance["files"] += [FUSION_FILE, FUSION_CONFIG_FILE]
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2), encoding="utf-8")
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
        fsync_directory(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return provenance


def main(argv: list[str] | None = None) -> int:
    trainer_lib.setup_logging()
    parser = argparse.ArgumentParser(prog="python -m ith_jax.export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a masked-LM workdir (text-only or ITH)")
    parser.add_argument("--out", required=True, help="the directory to write (new or empty)")
    parser.add_argument("--step", type=int, default=None, help="a periodic checkpoint instead of the best")
    args = parser.parse_args(argv)
    provenance = export_workdir(Path(args.workdir), Path(args.out), step=args.step)
    print(f"exported {provenance['kind']} workdir {args.workdir} (step {provenance['step']}) to {args.out}: "
          f"{', '.join(provenance['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
