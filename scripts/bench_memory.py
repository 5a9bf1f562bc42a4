"""Memory of the training step (``scripts/benchmark_train.py --memory`` and ``--max-batch``).

On a GPU each row reports the device's peak memory (``peak_mem_gib``: XLA's allocator
statistics, ``torch.cuda.max_memory_allocated`` for PyTorch). ``--max-batch`` finds the
largest batch whose training step runs, by bisection (for JAX starting from the compiled
step's memory analysis at ``--batch``; for PyTorch from ``--batch`` by doubling), and times
the step there.

``--memory`` only compiles the same step (nothing runs, so it works for B7 at 600 px on a
CPU), once with ``config.model.remat`` off and once on, and reports two figures per device:

- ``peak``: XLA's memory analysis of the compiled step, ``argument_size_in_bytes`` (state and
  batch) plus ``output_size_in_bytes`` (new state and metrics) less ``alias_size_in_bytes``
  (the donated state's buffers reused for the new state, which would otherwise count twice)
  plus ``temp_size_in_bytes`` (activations kept for the backward pass and other scratch): the
  most the program can hold at once. ``temp`` is the part that grows with the batch.
- ``residuals``: the bytes the forward pass hands to the backward pass (the values
  ``jax.vjp`` of the training-mode model keeps, inputs and parameters not counted), before
  any compiler: what remat removes, whatever backend compiles the step.

Per-example figures divide by the examples on one device.
"""

from __future__ import annotations

import time

from bench_recipe import BenchRun, jax_row, recipe_run, synthetic_batch
from benchmark_model import _bisect, _time


def is_oom(e: BaseException) -> bool:
    text = f'{type(e).__name__} {e}'
    return any(s in text for s in ('RESOURCE_EXHAUSTED', 'Out of memory', 'OutOfMemory'))


def max_batch_jax(name: str, batch: int, res: int, dtype: str, steps: int) -> dict:
    """The largest batch whose step runs on one device: the first guess scales the compiled
    step's memory analysis at ``batch`` to the device's memory, then bisection with real steps."""
    import gc

    import jax

    device = jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get('bytes_limit')
    run = recipe_run(name, batch, res, dtype, devices=[device])
    images = jax.ShapeDtypeStruct((batch, res, res, 3), 'uint8')
    labels = jax.ShapeDtypeStruct((batch,), 'int32')
    m = run.train_step.lower(run.abstract_state, {'image': images, 'label': labels})
    m = m.compile().memory_analysis()
    fixed = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    per_example = m.temp_size_in_bytes / batch
    guess = int((0.95 * limit - fixed) / per_example) if limit else batch
    timings = {}

    def fits(b: int) -> bool:
        gc.collect()
        try:
            r = recipe_run(name, b, res, dtype, devices=[device])
            state = r.init(jax.random.key(0))
            data = synthetic_batch(b, res, r.mesh)
            box = [state]

            def one_step():
                box[0], metrics = r.train_step(box[0], data)
                jax.block_until_ready(metrics)

            timings[b] = _time(one_step, steps)
            return True
        except Exception as e:  # noqa: BLE001 - only an out-of-memory error means "too big"
            if not is_oom(e):
                raise
            return False
        finally:
            jax.clear_caches()

    # Each try compiles the step again: few tries, growing 10% from the estimate.
    lo, hi = _bisect(fits, 0, None, max(1, guess), max_tries=4, grow=1.1)
    row = {**jax_row(name, lo, res, dtype), 'max_batch': lo, 'failed_batch': hi}
    row.update({'estimate_from_memory_analysis': guess, 'bytes_limit_gib': (limit or 0) / 2**30})
    if lo:
        row.update({'step_s': timings[lo], 'train_img_s': lo / timings[lo]})
    return row


def residual_bytes(run: BenchRun, batch: int, res: int) -> int:
    """Bytes the training-mode forward pass of ``run.model`` keeps for its backward pass (the
    residuals of ``jax.vjp`` with respect to the parameters), from tracing alone."""
    import jax

    v = run.abstract_variables
    images = jax.ShapeDtypeStruct((batch, res, res, 3), run.model.dtype)  # what it receives

    def forward(params, batch_stats, x):
        return run.model.apply(
            {'params': params, 'batch_stats': batch_stats},
            x,
            train=True,
            rngs={'dropout': jax.random.key(0)},
            mutable=['batch_stats'],
        )[0]

    def residuals(params, batch_stats, x):
        _, vjp_fn = jax.vjp(lambda p: forward(p, batch_stats, x), params)
        return jax.tree.leaves(vjp_fn)

    jaxpr = jax.make_jaxpr(residuals)(v['params'], v['batch_stats'], images).jaxpr
    inputs = set(jaxpr.invars)
    kept = {x for x in jaxpr.outvars if not hasattr(x, 'val') and x not in inputs}  # no literals
    return sum(x.aval.size * x.aval.dtype.itemsize for x in kept)


def memory_jax(name: str, batch: int, res: int, dtype: str, remat: bool) -> dict:
    """Compiles the train step for abstract inputs and reads its memory analysis, and counts
    the autodiff residuals (see the module docstring for the fields)."""
    import jax
    import numpy as np

    run = recipe_run(name, batch, res, dtype, remat=remat)
    per_device = batch // jax.device_count()
    residuals = residual_bytes(run, per_device, res)
    images = jax.ShapeDtypeStruct((batch, res, res, 3), np.uint8)
    labels = jax.ShapeDtypeStruct((batch,), np.int32)
    t0 = time.perf_counter()
    lowered = run.train_step.lower(run.abstract_state, {'image': images, 'label': labels})
    m = lowered.compile().memory_analysis()
    compile_s = time.perf_counter() - t0
    mib = 2.0**20
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {
        **jax_row(name, batch, res, dtype),
        'remat': remat,
        'compile_s': compile_s,
        'argument_mib': m.argument_size_in_bytes / mib,
        'output_mib': m.output_size_in_bytes / mib,
        'alias_mib': m.alias_size_in_bytes / mib,
        'temp_mib': m.temp_size_in_bytes / mib,
        'peak_mib': peak / mib,
        'peak_mib_per_example': peak / mib / per_device,
        'temp_mib_per_example': m.temp_size_in_bytes / mib / per_device,
        'residual_mib_per_example': residuals / mib / per_device,
    }
