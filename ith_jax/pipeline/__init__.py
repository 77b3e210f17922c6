"""The one-command pipeline: every stage of the project chained, resumable, as the commands a user would type.

    python -m ith_jax.pipeline --config configs/pipeline.py:demo --workdir runs/demo
    python -m ith_jax.pipeline --config configs/pipeline.py --workdir runs/paper --config.data_dir=DIR

Stages: data (the synthetic sample or a row subset, only when configured) -> span detector training -> detection
on every file the LMs read -> ORACLE pitch table (where configured) and ``audio_gen.build_cache`` per task ->
text-only and ITH LM training per task -> evaluation with per-example predictions -> the HTML report.  Each stage
is a subprocess running exactly the command a user would type for it alone (printed, and collected in
``WORKDIR/commands.sh``); this process imports neither jax nor torch, only `ith_common`.

- `plan.build_plan(config, workdir)` turns the pipeline config into `Step`s (command, inputs, outputs, check).
- `runner.run_pipeline(plan, ...)` decides what is done (a ``STAGE_DONE.json`` record whose digest of command and
  inputs matches, and outputs that verify cheaply), runs the rest with a log per step and an ETA, and prints the
  accuracy table at the end.

Layout and records: docs/pipeline.md.
"""
