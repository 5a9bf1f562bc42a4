"""The jitted steps on a tiny model: 8 devices == 1 device, float32 loss under bfloat16, exact
eval counts, and checkpoints restored onto a different mesh."""

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import input_pipeline
from configs import smoke
from training import checkpoint, compilation, sharding
from training import run as run_lib
from training.train_step import make_eval_step


def _config(**model):
    c = smoke.get_config()
    c.optim.warmup_epochs = 0.0  # a non-zero learning rate on the first step
    for k, v in model.items():
        c.model[k] = v
    return c


def _build(config, mesh, fsdp_min_size=None):
    """The run train.py wires (training.run.create_run) on ``mesh``, its state from key 0."""
    if fsdp_min_size is not None:
        config = copy.deepcopy(config)
        config.mesh.fsdp_min_size = fsdp_min_size
    run = run_lib.create_run(config, mesh=mesh)
    return run.plan, run.model, run.init_state(0), run.state_shardings, run.train_step


def _batch(config, step=0):
    it = input_pipeline.create_train_iterator(
        config.data, global_batch_size=config.batch_size, seed=0, start_step=step
    )
    return next(it)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_states_close(ours, ref, tol, opt_tol):
    """Every array of the two states' variables, EMA and optimizer state agrees within ``tol``
    (``opt_tol`` for the optimizer state), named by its path on failure."""
    for field in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats', 'opt_state'):
        t = opt_tol if field == 'opt_state' else tol
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(getattr(ours, field))[0],
            jax.tree.leaves(getattr(ref, field)),
        ):
            np.testing.assert_allclose(
                a, b, atol=t, rtol=t, err_msg=f'{field}{jax.tree_util.keystr(path)}'
            )


@pytest.fixture(scope='module')
def eight_device_run():
    config = _config()
    mesh = sharding.create_mesh(1)
    assert mesh.size == 8
    _, model, state, shardings, step = _build(config, mesh)
    init_params = _host(state.params)
    state, metrics = step(state, sharding.global_batch(_batch(config), mesh))
    return dict(
        config=config,
        mesh=mesh,
        model=model,
        state=state,
        shardings=shardings,
        init_params=init_params,
        metrics=_host(metrics),
    )


def test_eight_devices_equal_one_device(eight_device_run):
    """Same global batch, bn_group_size=8: params, BN statistics and EMA agree within 1e-5."""
    r = eight_device_run
    config = r['config']
    assert config.model.bn_group_size == 8
    mesh1 = sharding.create_mesh(1, devices=jax.devices()[:1])
    _, _, state1, _, step1 = _build(config, mesh1)
    state1, metrics1 = step1(state1, sharding.global_batch(_batch(config), mesh1))
    s8, s1 = _host(r['state']), _host(state1)
    for field in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats'):
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(getattr(s8, field))[0],
            jax.tree.leaves(getattr(s1, field)),
        ):
            np.testing.assert_allclose(
                a, b, atol=1e-5, rtol=1e-5, err_msg=f'{field}{jax.tree_util.keystr(path)}'
            )
    np.testing.assert_allclose(r['metrics']['loss'], np.asarray(metrics1['loss']), rtol=1e-5)
    # The step did move the weights, the statistics and the EMA.
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), s8.params, r['init_params'])
    assert max(jax.tree.leaves(moved)) > 1e-4
    assert int(s8.step) == 1


def test_loss_stays_float32_under_bfloat16():
    config = _config(compute_dtype='bfloat16')
    run = run_lib.create_run(config, mesh=sharding.create_mesh(1))
    model, abstract = run.model, run.abstract_state
    batch = {
        'image': jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.uint8),
        'label': jax.ShapeDtypeStruct((16,), jnp.int32),
    }
    new_state, metrics = jax.eval_shape(run.train_step, abstract, batch)
    assert metrics['loss'].dtype == jnp.float32
    assert metrics['total_loss'].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
    logits = jax.eval_shape(
        lambda v, x: model.apply(v, x),
        {'params': abstract.params, 'batch_stats': abstract.batch_stats},
        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.bfloat16),
    )
    assert logits.dtype == jnp.float32


def test_eval_counts_every_example_once_on_eight_devices(eight_device_run):
    r = eight_device_run
    config = r['config']
    config.data.fake_num_eval = 37  # 3 batches of 16, the last one 5 real + 11 padding
    eval_step = make_eval_step(r['model'], mesh=r['mesh'], state_shardings=r['shardings'])
    outs = [
        eval_step(r['state'], sharding.global_batch(b, r['mesh']))
        for b in input_pipeline.create_eval_iterator(config.data, global_batch_size=16)
    ]
    raw = {k: sum(int(o['raw'][k]) for o in outs) for k in ('count', 'top1', 'top5')}
    assert raw['count'] == 37
    assert int(sum(int(o['ema']['count']) for o in outs)) == 37
    # The same sums from unpadded, unsharded logits.
    imgs, labels = [], []
    for b in input_pipeline.create_eval_iterator(config.data, global_batch_size=16):
        imgs.append(b['image'][b['mask']])
        labels.append(b['label'][b['mask']])
    x = (np.concatenate(imgs).astype(np.float32) - np.array([123.675, 116.28, 103.53])) / np.array(
        [58.395, 57.12, 57.375]
    )
    s = _host(r['state'])
    logits = r['model'].apply(
        {'params': s.params, 'batch_stats': s.batch_stats}, jnp.asarray(x, jnp.float32)
    )
    ranks = (
        np.asarray(logits)
        > np.take_along_axis(np.asarray(logits), np.concatenate(labels)[:, None], 1)
    ).sum(1)
    assert raw['top1'] == int((ranks < 1).sum()) and raw['top5'] == int((ranks < 5).sum())


def test_checkpoint_restores_onto_a_different_mesh(eight_device_run, tmp_path):
    r = eight_device_run
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(1, r['state'], data_state={'step': 1, 'seed': 3})
    ckpt.wait()
    # 4-way data x 2-way fsdp, with every array large enough to be sharded.
    mesh = sharding.create_mesh(2)
    abstract = jax.eval_shape(lambda s: s, r['state'])
    shardings = sharding.state_shardings(abstract, mesh, fsdp_min_size=1)
    restored, data_state = checkpoint.Checkpointer(str(tmp_path)).restore(abstract, shardings)
    assert data_state == {'step': 1, 'seed': 3}
    kernel = restored.params['stem_conv']['kernel']
    assert kernel.sharding.spec != jax.sharding.PartitionSpec()  # really sharded over fsdp
    for a, b in zip(jax.tree.leaves(_host(restored)), jax.tree.leaves(_host(r['state']))):
        np.testing.assert_array_equal(a, b)


def test_data_states_are_removed_with_their_checkpoints(eight_device_run, tmp_path):
    """The data state is an item of its checkpoint: rotation removes both together."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, keep_best=False)
    for step in (1, 2, 3):
        ckpt.save(step, eight_device_run['state'], data_state={'step': step})
        ckpt.wait()
    ckpt.close()
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3']
    assert 'data' in os.listdir(tmp_path / 'checkpoints' / '3')
    assert not (tmp_path / 'data_state').exists()


def test_cpu_init_compiler_options_are_applied_and_keep_values_bit_identical(monkeypatch):
    """compilation.CPU_INIT_COMPILER_OPTIONS (LLVM level 1: the initialisation compiles
    faster) gives an initial state bit-identical to XLA's default level. Level 0 changes the
    values, which shows the options reach the compiler (and why level 0 is not used)."""
    config = _config()
    mesh1 = sharding.create_mesh(1, devices=jax.devices()[:1])
    assert compilation.init_compiler_options(mesh1) == {'xla_backend_optimization_level': 1}
    runs = {}
    for name, options in (
        ('default', None),
        ('level1', {'xla_backend_optimization_level': 1}),
        ('level0', {'xla_backend_optimization_level': 0}),
    ):
        monkeypatch.setattr(compilation, 'init_compiler_options', lambda mesh, o=options: o)
        runs[name] = _host(_build(config, mesh1)[2])
    for got, want in zip(jax.tree.leaves(runs['level1']), jax.tree.leaves(runs['default'])):
        np.testing.assert_array_equal(got, want)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(runs['level0']), jax.tree.leaves(runs['default']))
    )


def test_compilation_cache_directory_errors_are_clear(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    with pytest.raises(ValueError, match='compilation_cache_dir'):
        compilation.enable_persistent_cache(str(blocker / 'cache'))


def test_fsdp_step_equals_data_parallel_step(eight_device_run):
    """4-way data x 2-way fsdp with every array sharded (fsdp_min_size=1): the initial state is
    the same numbers as the replicated one, and one step matches the 8-way data-parallel step
    within 1e-5 (XLA inserts the all-gathers and reduce-scatters)."""
    r = eight_device_run
    config = r['config']
    mesh = sharding.create_mesh(2)
    _, _, state, shardings, step = _build(config, mesh, fsdp_min_size=1)
    kernel = state.params['stem_conv']['kernel']
    assert kernel.sharding.spec != jax.sharding.PartitionSpec()  # really sharded over fsdp
    for a, b in zip(jax.tree.leaves(_host(state.params)), jax.tree.leaves(r['init_params'])):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, sharding.global_batch(_batch(config), mesh))
    ours, ref = _host(state), _host(r['state'])
    # RMSProp's second moment holds squared gradients, which double the relative rounding of
    # the sharded reduction (measured up to 2.9e-5 on stem_conv): 1e-4 there.
    _assert_states_close(ours, ref, tol=1e-5, opt_tol=1e-4)
    np.testing.assert_allclose(np.asarray(metrics['loss']), r['metrics']['loss'], rtol=1e-5)


@pytest.mark.slow  # two small training steps compiled, scanned and not: about a minute
def test_a_stacked_train_state_steps_saves_and_restores_as_the_per_block_one(tmp_path):
    """With ``scan_blocks`` the train state holds each stage's repeated blocks stacked
    (``blocks_<i>_to_<j>``): it is the unscanned run's state rearranged (initialisation equal
    bit for bit, optimizer state and EMA included), a step moves it as the unscanned step moves
    its own (within float32 rounding), and a checkpoint holds it per block (what the weight
    readers and ``init_from`` read), restored into the stacked layout bit for bit."""
    from efficientnet.model import stacked_range
    from efficientnet.weights import train_state
    from training import state as state_lib

    mesh = sharding.create_mesh(1, devices=jax.devices()[:1])
    runs = {
        scan: run_lib.create_run(_config(depth=1.0, scan_blocks=scan), mesh=mesh)
        for scan in (False, True)
    }
    states = {scan: run.init_state(0) for scan, run in runs.items()}
    stacked = [k for k in states[True].params if stacked_range(k)]
    assert sorted(stacked) == ['blocks_12_to_14', 'blocks_6_to_7', 'blocks_9_to_10']
    assert not any('_to_' in k for k in states[False].params)
    assert states[True].params['blocks_12_to_14']['expand_conv']['kernel'].shape[0] == 3
    as_blocks = _host(state_lib.per_block(states[True]))
    plain = _host(states[False])
    assert jax.tree.structure(as_blocks) == jax.tree.structure(plain)
    jax.tree.map(np.testing.assert_array_equal, as_blocks, plain)
    # The repeats of a run are initialised from keys of their own.
    kernels = as_blocks.params
    assert not np.array_equal(kernels['blocks_6']['expand_conv']['kernel'],
                              kernels['blocks_7']['expand_conv']['kernel'])  # fmt: skip
    back = state_lib.stacked_like(as_blocks, runs[True].abstract_state)
    jax.tree.map(np.testing.assert_array_equal, back, _host(states[True]))

    batch = sharding.global_batch(_batch(runs[True].config), mesh)
    stepped = {scan: run.train_step(states[scan], batch)[0] for scan, run in runs.items()}
    ours, ref = _host(state_lib.per_block(stepped[True])), _host(stepped[False])
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref.params, plain.params)
    assert max(jax.tree.leaves(moved)) > 1e-4
    # Stochastic depth divides by a traced rate in the scan (tests/test_model.py): the gradients
    # agree within 1e-3, and RMSProp's second moment holds their squares.
    _assert_states_close(ours, ref, tol=1e-4, opt_tol=1e-3)

    ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=False, async_save=False)
    ckpt.save(1, stepped[True])
    ckpt.close()
    saved = train_state.read_variables(str(tmp_path / 'checkpoints' / '1'))
    assert jax.tree.structure(saved['params']) == jax.tree.structure(ours.ema_params)
    jax.tree.map(np.testing.assert_array_equal, saved['params'], ours.ema_params)
    restored, _ = checkpoint.Checkpointer(str(tmp_path)).restore(
        runs[True].abstract_state, runs[True].state_shardings
    )
    assert jax.tree.structure(restored) == jax.tree.structure(stepped[True])
    jax.tree.map(np.testing.assert_array_equal, _host(restored), _host(stepped[True]))
