"""ith-jax: Imagine to Hear in JAX/Flax. ``ith_jax.load(workdir)`` restores a trained workdir for prediction
(``ith_jax.api``); importing the package itself loads nothing heavy (no JAX until ``load`` is called)."""


def load(workdir, which: str = "best", **options):
    """``ith_jax.api.load``: a ``Predictor`` for a trained workdir (imported on first use: JAX is heavy)."""
    from ith_jax.api import load as load_workdir

    return load_workdir(workdir, which, **options)
