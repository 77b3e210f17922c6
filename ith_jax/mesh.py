"""Devices, the data-parallel mesh, and moving host batches onto it.

One 1-D mesh over every device of every process, axis ``"data"``: batches are split along it, parameters
and optimizer state are replicated. We build the ``Mesh`` ourselves rather than with ``jax.make_mesh``,
whose default axis type in current JAX is Explicit (sharding in types), which this plain data-parallel
program does not need.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ith_common.errors import UserError

logger = logging.getLogger("ith_jax")

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-process run (one process per host, or several on one CPU host in tests)."""
    if not coordinator_address:
        if num_processes != 1:
            raise UserError("distributed.num_processes > 1 needs distributed.coordinator_address (host:port)")
        return
    # Cross-process collectives on CPU devices go through gloo (without it a multi-process CPU run cannot
    # all-reduce); the setting only concerns the CPU backend. It must be set, like initialize itself, before
    # anything touches a device, so no backend query here.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    logger.info("joined distributed run: process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())


def make_data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    if batch_size % mesh.size:
        raise UserError(f"{what}={batch_size} must be a multiple of the number of devices ({mesh.size}) "
                        "for data parallelism")


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a global host batch on the mesh, split along the leading axis.

    Every process builds the same global batch (the data order is a function of seed and epoch only), and
    each contributes the rows that belong to its own devices; with one process this is a plain device_put.
    """
    sharding = batch_sharded(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf):
        leaf = np.asarray(leaf)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Fetches (replicated or batch-sharded) arrays to numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
