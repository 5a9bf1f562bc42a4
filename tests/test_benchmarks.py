"""scripts/benchmark_train.py: it times the step train.py runs, and it runs where only jax,
flax, optax and torch are installed (the GPU machines' image: no TensorFlow, tfds, clu or
ml_collections). Speeds are never asserted here (docs/benchmarks.md)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs import base
from scripts import bench_recipe, benchmark_model
from training import config_resolve
from training import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING_ON_GPU_IMAGE = ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections', 'keras')


@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_recipe_run_compiles_to_the_step_of_the_base_config(dtype):
    """The benchmark wires the official recipe without configs/: the train step it builds
    lowers to the same program as training.run.create_run's from configs/base.py (same
    model, schedule, optimizer, decay mask, EMA and shardings), and so does the state
    initialisation. A recipe change in configs/base.py that the benchmark misses fails here.
    float16 is configs/fp16.py's setting: float16 compute with dynamic loss scaling."""
    name, batch, res = 'efficientnet-tiny', 8, 32
    config = base.get_config()
    config.model.name = name
    config.model.compute_dtype = dtype
    if dtype == 'float16':
        config.loss_scale.mode = 'dynamic'
    config.data.resolution = res
    config.batch_size = batch
    plan = config_resolve.resolve(
        config,
        device_count=jax.device_count(),
        dataset_info_fn=lambda _: bench_recipe.IMAGENET,
    )
    ours = run_lib.create_run(config, plan)
    bench = bench_recipe.recipe_run(name, batch, res, dtype)
    assert bench.model == ours.model
    batch_shapes = {
        'image': jax.ShapeDtypeStruct((batch, res, res, 3), 'uint8'),
        'label': jax.ShapeDtypeStruct((batch,), 'int32'),
    }
    lower = lambda step: step.lower(ours.abstract_state, batch_shapes).as_text()
    assert lower(bench.train_step) == lower(ours.train_step)
    key = jax.random.key(0)
    loss_scale = run_lib.loss_scale_lib.from_config(config)
    init = run_lib.state_lib.jit_init(
        run_lib.state_lib.make_init_fn(ours.model, ours.tx, res, loss_scale),
        ours.state_shardings,
        ours.mesh,
    )
    assert bench.init.lower(key).as_text() == init.lower(key).as_text()


@pytest.mark.slow  # a tiny model's state initialisation and train step compile: ~1 min idle
def test_benchmark_runs_without_tensorflow_clu_or_ml_collections(tmp_path):
    """The script on a tiny model, in a Python where TensorFlow, tfds, clu, ml_collections and
    Keras cannot be imported: it reports the time to the first step in parts, the step's
    speed and (``--update-compile``) the compile time of the step's per-parameter part."""
    poison = f'import sys; sys.modules.update(dict.fromkeys({MISSING_ON_GPU_IMAGE!r}))'
    run = "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    env = dict(os.environ, EFFICIENTNET_TCMALLOC='0', XLA_FLAGS='', JAX_PLATFORMS='cpu')
    args = ['--model', 'tiny', '--batch', '2', '--resolution', '32', '--steps', '1']
    args += ['--cache-dir', str(tmp_path / 'cache'), '--json', '--update-compile']
    script = os.path.join(ROOT, 'scripts', 'benchmark_train.py')
    p = subprocess.run(
        [sys.executable, '-c', f'{poison}; {run}', script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout[p.stdout.index('[') :])
    assert [r['scan_blocks'] for r in rows] == [False]  # the default on CPU: unscanned
    for r in rows:
        assert r['model'] == 'efficientnet-tiny' and r['batch'] == 2 and r['backend'] == 'cpu'
        parts = r['trace_s'] + r['compile_s'] + r['first_run_s']
        assert 0 < parts <= r['time_to_first_step_s'] and r['train_img_s'] > 0
        assert 0 < r['update_compile_s'] < r['step_compile_s'] and r['update_trace_s'] > 0


@pytest.mark.parametrize('fits_below', [1, 5, 37, 1000])
def test_bisect_finds_the_largest_batch_that_fits(fits_below):
    tried = []

    def fits(b):
        tried.append(b)
        return b < fits_below

    lo, hi = benchmark_model._bisect(fits, 0, None, 4, max_tries=20)
    assert lo < fits_below <= hi and hi - lo <= max(1, lo // 32)  # within 3%
    assert len(tried) <= 2 * fits_below.bit_length() + 2  # doubling, then halving


def test_scan_conv_benchmark_compares_the_same_computation():
    """``scripts/bench_scan_conv.py`` times a forward pass and both gradients of blocks that
    the unrolled form and both scanned ones (XLA's convolution, the project's) compute alike
    (docs/benchmarks.md quotes its ratios)."""
    from scripts import bench_scan_conv

    rows = bench_scan_conv.measure(batch=2, size=8, channels=4, blocks=3, steps=1)
    assert [r['part'] for r in rows] == ['forward', 'input_gradient', 'kernel_gradient']
    for r in rows:
        assert min(r['unrolled_s'], r['scanned_s'], r['scanned_ours_s']) > 0
        assert r['backend'] == 'cpu' and r['max_rel_diff'] < 1e-5, r


@pytest.mark.slow  # a tiny model's state initialisation and train step compile: ~40 s idle
def test_profile_step_attributes_the_step_time_to_layers_and_phases():
    """``scripts/profile_step.py`` joins XLA:CPU's trace events to the model's layer names:
    the tiny model's step shows forward and backward rows of its blocks' layers (the C++
    depthwise and BatchNorm kernels among them) and the per-parameter update."""
    script = os.path.join(ROOT, 'scripts', 'profile_step.py')
    args = ['--model', 'tiny', '--batch', '2', '--resolution', '32', '--steps', '1', '--top', '200']
    env = dict(os.environ, EFFICIENTNET_TCMALLOC='0', XLA_FLAGS='', JAX_PLATFORMS='cpu')
    p = subprocess.run(
        [sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stderr[-3000:]
    header, *lines = p.stdout.strip().splitlines()
    assert header.startswith('model=tiny batch=2 resolution=32 step_s=')
    rows = [line.split() for line in lines]
    assert all(float(r[0]) >= 0 and int(r[1]) >= 1 for r in rows)
    layers = {(r[2], r[3]) for r in rows}
    for phase in ('forward', 'backward'):
        assert (phase, 'blocks_N/dw_conv') in layers, sorted(layers)
        assert (phase, 'blocks_N/expand_bn') in layers, sorted(layers)
    assert any(r[2] == 'update' for r in rows), sorted(layers)
