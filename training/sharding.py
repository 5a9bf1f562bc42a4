"""The device mesh and the sharding rules for the train state and the batches.

The mesh has a 'data' axis and an 'fsdp' axis (size 1 unless asked for). Batches are split over
both axes, so every device holds different examples. Parameters and optimizer state are either
replicated, or (fsdp > 1) sharded over 'fsdp' on their largest divisible dimension; XLA's SPMD
partitioner inserts the all-gathers and reduce-scatters. The step body never names an axis.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ('data', 'fsdp')


def create_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices. Devices keep jax.devices() order, which groups each
    process's devices together, so a process's local batch rows land on its own devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f'mesh.fsdp={fsdp} must be a positive divisor of the {n} devices')
    grid = np.asarray(devices, dtype=object).reshape(n // fsdp, fsdp)
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return Mesh(grid, DATA_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """Shards the largest dimension divisible by ``fsdp`` over 'fsdp'; small or indivisible
    arrays (BN vectors, scalars) stay replicated, which costs little and avoids padding."""
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = 'fsdp'
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp_min_size: int = 2**14) -> Any:
    """NamedShardings for every leaf of a state pytree (shapes from jax.eval_shape)."""
    fsdp = mesh.shape['fsdp']
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, fsdp_min_size)),
        abstract_state,
    )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax.Arrays split over the mesh (multi-process safe)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def place(host_tree: Any, mesh: Mesh, fsdp_min_size: int = 2**14) -> Any:
    """Host (numpy) arrays -> global jax.Arrays placed by the state rules (``state_shardings``);
    every process passes the same values (multi-process safe)."""
    shardings = state_shardings(host_tree, mesh, fsdp_min_size)

    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, host_tree, shardings)


def shardings_of(tree: Any) -> Any:
    """The shardings of a tree of jax.Arrays (``place``'s output), for jit's in_shardings."""
    return jax.tree.map(lambda x: x.sharding, tree)
