"""The files and helpers that the two halves of ith-jax share.

``ith_jax`` (JAX, never torch) and ``audio_gen`` (the torch sidecar) meet only in documented, versioned files:
the span manifest, the audio cache and the configs that describe them.  Everything both halves need to read or
write those files lives here, so that neither half imports the other:

    ith_jax  ──►  ith_common  ◄──  audio_gen

Modules here import only the standard library, numpy and ml_collections (``hub`` imports huggingface_hub
inside its one function).  ``tests/test_architecture.py`` fails when that changes.
"""
