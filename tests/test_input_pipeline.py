"""The tf.data pipeline on tfds's real imagenet2012 builder (prepared offline as array_record
from a generated manual dir): shapes, labels, exact eval, one global order whatever the process
count, determinism and resume from the step; and on the fake source: the same, exact eval
masks."""

import numpy as np
import pytest
import tensorflow as tf

import input_pipeline
from input_pipeline import order, pipeline
from tests import input_fixtures as fx

RES = 32
NUM_IDS = 125


@pytest.fixture(scope='session')
def imagenet():
    return fx.prepared_imagenet()


def imagenet_config(imagenet, **overrides):
    data_dir, manual_dir, _ = imagenet
    return fx.data_config(data_dir=data_dir, manual_dir=manual_dir, resolution=RES, **overrides)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_batches_on_imagenet(imagenet):
    config = imagenet_config(imagenet, augment='randaugment')
    it = input_pipeline.create_train_iterator(config, global_batch_size=4, seed=0)
    expected = imagenet[2]
    batches = take(it, 6)  # two epochs of 12
    for b in batches:
        assert set(b) == {'image', 'label'}
        assert b['image'].shape == (4, RES, RES, 3) and b['image'].dtype == np.uint8
        assert b['label'].shape == (4,) and b['label'].dtype == np.int32
    labels = np.concatenate([b['label'] for b in batches])
    assert set(labels) == {0, 1, 500}
    images = np.concatenate([b['image'] for b in batches])
    assert images.min() < 20 and images.max() > 200  # full uint8 range, RandAugment included
    # Without augmentation the colour identifies the example: labels belong to it, and each
    # epoch visits every example once.
    config = imagenet_config(imagenet)
    it = input_pipeline.create_train_iterator(config, global_batch_size=4, seed=0)
    batches = take(it, 6)
    ids = fx.identify(np.concatenate([b['image'] for b in batches]), NUM_IDS)
    labels = np.concatenate([b['label'] for b in batches])
    assert [expected[i] for i in ids] == list(labels)
    assert sorted(ids[:12]) == list(range(12)) and sorted(ids[12:]) == list(range(12))
    assert list(ids[:12]) != list(ids[12:]), 'each epoch should be reshuffled'


def test_train_mixup_labels(imagenet):
    config = imagenet_config(imagenet, mixup_alpha=0.2, cutmix_alpha=1.0)
    batch = next(input_pipeline.create_train_iterator(config, global_batch_size=4, seed=1))
    assert batch['image'].dtype == np.uint8 and batch['image'].shape == (4, RES, RES, 3)
    assert batch['label'].shape == (4, 1000) and batch['label'].dtype == np.float32
    np.testing.assert_allclose(batch['label'].sum(1), 1.0, rtol=1e-5)
    assert set(np.nonzero(batch['label'])[1]) <= {0, 1, 500}


def test_eval_batches_on_imagenet(imagenet):
    config = imagenet_config(imagenet)
    batches = list(input_pipeline.create_eval_iterator(config, global_batch_size=4))
    assert len(batches) == 2
    for b in batches:
        assert set(b) == {'image', 'label', 'mask'}
        assert b['image'].shape == (4, RES, RES, 3) and b['image'].dtype == np.uint8
        assert b['label'].dtype == np.int32 and b['mask'].dtype == np.bool_
    mask = np.concatenate([b['mask'] for b in batches])
    ids = fx.identify(np.concatenate([b['image'] for b in batches])[mask], NUM_IDS)
    labels = np.concatenate([b['label'] for b in batches])[mask]
    assert sorted(ids) == list(range(100, 107))
    assert [imagenet[2][i] for i in ids] == list(labels)
    assert input_pipeline.dataset_info(config) == {
        'num_classes': 1000, 'num_train': 12, 'num_eval': 7,
    }  # fmt: skip


@pytest.mark.parametrize('process_count,global_batch', [(1, 4), (2, 4), (3, 6), (2, 8)])
def test_eval_exact_over_processes(imagenet, process_count, global_batch):
    """7 examples, divisible by neither batch nor process count: each counted exactly once."""
    config = imagenet_config(imagenet)
    per_process = [
        list(
            input_pipeline.create_eval_iterator(
                config, global_batch_size=global_batch, process_index=p,
                process_count=process_count,
            )
        )
        for p in range(process_count)
    ]  # fmt: skip
    assert len({len(batches) for batches in per_process}) == 1, 'same batch count everywhere'
    ids, total = [], 0
    for batches in per_process:
        for b in batches:
            assert b['image'].shape[0] == global_batch // process_count
            total += int(b['mask'].sum())
            ids += list(fx.identify(b['image'][b['mask']], NUM_IDS))
            assert not b['image'][~b['mask']].any(), 'padding is zeros'
    assert total == 7
    assert sorted(ids) == list(range(100, 107))


def per_process(config, process_count, steps, start_step=0, **kwargs):
    """Each process's batches, joined side by side: what the global batches would be."""
    parts = [
        take(
            input_pipeline.create_train_iterator(
                config, process_index=p, process_count=process_count, start_step=start_step,
                **kwargs,
            ),
            steps,
        )
        for p in range(process_count)
    ]  # fmt: skip
    return [{k: np.concatenate([b[k] for b in batch]) for k in batch[0]} for batch in zip(*parts)]


def test_processes_read_their_rows_of_one_global_order(imagenet):
    """Two processes' local batches side by side are one process's batches, with RandAugment
    and MixUp/CutMix on, here resumed mid-epoch (step 1; 12 examples, 8 per step). (Real
    processes, 1, 2 and 4 of them: tests/test_input_distributed.py.)"""
    config = imagenet_config(
        imagenet, augment='randaugment', mixup_alpha=0.4, cutmix_alpha=1.0, mix_group_size=2
    )
    kwargs = dict(global_batch_size=8, seed=5)
    one = take(input_pipeline.create_train_iterator(config, **kwargs), 4)
    assert_same_batches(per_process(config, 2, 3, start_step=1, **kwargs), one[1:])


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_same_seed_same_batches_and_resume(imagenet):
    config = imagenet_config(imagenet, augment='randaugment', mixup_alpha=0.4)
    kwargs = dict(global_batch_size=4, seed=7)
    full = take(input_pipeline.create_train_iterator(config, **kwargs), 8)
    again = take(input_pipeline.create_train_iterator(config, **kwargs), 8)
    assert_same_batches(full, again)
    other = next(input_pipeline.create_train_iterator(config, global_batch_size=4, seed=8))
    assert not np.array_equal(other['image'], full[0]['image'])

    # Restored from the state after 5 batches (in the second epoch of 12, mid-epoch).
    it = input_pipeline.create_train_iterator(config, **kwargs)
    take(it, 5)
    state = it.state()
    assert it.step == 5 and state['step'] == 5
    start = it.stream.check_resume(state)
    resumed = input_pipeline.create_train_iterator(config, start_step=start, **kwargs)
    assert_same_batches(take(resumed, 3), full[5:])


def test_order_does_not_depend_on_a_global_tf_seed(imagenet):
    """A process that set TF's global seed (as Keras's set_random_seed does) gets the same
    batches as one that did not, and keeps its own seed."""
    config = imagenet_config(imagenet)
    kwargs = dict(global_batch_size=4, seed=7)
    plain = take(input_pipeline.create_train_iterator(config, **kwargs), 6)
    tf.random.set_seed(123)
    try:
        seeded = take(input_pipeline.create_train_iterator(config, **kwargs), 6)
        assert tf.compat.v1.get_seed(None)[0] == 123
    finally:
        tf.random.set_seed(None)
    assert_same_batches(seeded, plain)


def test_resume_state_is_the_step_and_refuses_another_stream(imagenet):
    config = imagenet_config(imagenet)
    it = input_pipeline.create_train_iterator(config, global_batch_size=4, seed=0)
    next(it)
    state = it.state()
    assert state == {
        'version': 2, 'step': 1, 'seed': 0, 'num_examples': 12, 'global_batch_size': 4,
    }  # fmt: skip
    # Another process count is the same stream: accepted.
    other_layout = input_pipeline.create_train_iterator(
        config, global_batch_size=4, seed=0, process_index=1, process_count=2
    )
    assert other_layout.stream.check_resume(state) == 1
    for changed, message in [
        (dict(seed=1), 'seed 0, this run has 1: pass --config.seed=0'),
        (dict(global_batch_size=6), 'trained with 4 images per step, this run has 6'),
    ]:
        kwargs = dict(global_batch_size=4, seed=0) | changed
        other = input_pipeline.create_train_iterator(config, **kwargs)
        with pytest.raises(ValueError, match=message):
            other.stream.check_resume(state)
    with pytest.raises(ValueError, match='on 12 training examples, this run has 6'):
        fewer = imagenet_config(imagenet, train_split='train[:6]')
        it_fewer = input_pipeline.create_train_iterator(fewer, global_batch_size=4, seed=0)
        it_fewer.stream.check_resume(state)
    with pytest.raises(ValueError, match='format version 1'):
        it.stream.check_resume({**state, 'version': 1})


def test_fake_source_pipeline_and_cache():
    config = fx.data_config(
        name='fake', resolution=RES, num_classes=10, fake_num_train=20, fake_num_eval=9,
        cache=True,
    )  # fmt: skip
    assert input_pipeline.dataset_info(config) == {
        'num_classes': 10, 'num_train': 20, 'num_eval': 9,
    }  # fmt: skip
    a = take(input_pipeline.create_train_iterator(config, global_batch_size=5, seed=3), 6)
    b = take(input_pipeline.create_train_iterator(config, global_batch_size=5, seed=3), 6)
    assert_same_batches(a, b)
    assert all(x['label'].max() < 10 for x in a)
    for _ in range(2):  # cached eval dataset, iterated twice
        batches = list(input_pipeline.create_eval_iterator(config, global_batch_size=4))
        assert sum(int(x['mask'].sum()) for x in batches) == 9


def test_fake_batches_do_not_depend_on_the_process_count():
    """The fake source walks one global order on every process, each keeping its rows, so 2
    processes' local batches side by side are 1 process's."""
    config = fx.data_config(
        name='fake', resolution=RES, num_classes=10, fake_num_train=10, fake_num_eval=3,
        augment='randaugment',
    )  # fmt: skip
    one = take(input_pipeline.create_train_iterator(config, global_batch_size=4, seed=2), 6)
    for start in (0, 3):  # 3: resumed in the second epoch of 10 examples
        two = [
            take(
                input_pipeline.create_train_iterator(
                    config, global_batch_size=4, seed=2, process_index=p, process_count=2,
                    start_step=start,
                ),
                6 - start,
            )
            for p in range(2)
        ]  # fmt: skip
        joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*two)]
        assert_same_batches(joined, one[start:])


@pytest.mark.parametrize('num_eval,processes', [(37, 1), (37, 2), (16, 1), (1, 2)])
def test_fake_eval_masks_sum_to_split_size(num_eval, processes):
    config = fx.data_config(name='fake', resolution=RES, num_classes=10, fake_num_eval=num_eval)
    total = 0
    for p in range(processes):
        batches = list(
            input_pipeline.create_eval_iterator(
                config, global_batch_size=16, process_index=p, process_count=processes
            )
        )
        assert all(b['image'].shape[0] == 16 // processes for b in batches)
        total += sum(int(b['mask'].sum()) for b in batches)
    assert total == num_eval


def test_eval_batch_count_helper():
    assert pipeline.eval_batches_per_process(7, 2, 2) == 2
    assert pipeline.eval_batches_per_process(50000, 128, 8) == 49
    with pytest.raises(ValueError, match='multiple of the process count 3'):
        order.local_batch_size(10, 3)
