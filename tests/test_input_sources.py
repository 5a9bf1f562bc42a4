"""Sources: tfds imagenet2012 (prepared as array_record, as TFRecord (refused, then converted in
place) and missing),
Debian's Fashion-MNIST, image folders (with corrupt, truncated, grayscale, CMYK and PNG files),
fake data, eval sharding."""

import gzip
import logging
import os
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import input_pipeline
from input_pipeline import sources
from input_pipeline.sources import base, fake, fashion_mnist, folder, tfds_source
from tests import input_fixtures as fx

FASHION_DIR = fashion_mnist.DEBIAN_FASHION_MNIST_DIR


def test_shard_bounds_are_disjoint_and_cover():
    for n in (0, 1, 7, 50000):
        for p_count in (1, 2, 3, 8):
            bounds = [base.shard_bounds(n, p, p_count) for p in range(p_count)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


def read_all(examples):
    """Every example of a split, in index order, through the batched read and the load."""
    records = examples.read(tf.range(examples.num_examples, dtype=tf.int64))
    return [examples.load(row(records, i)) for i in range(examples.num_examples)]


def row(records, i):
    return tf.nest.map_structure(lambda r: r[i], records)


def test_imagenet2012_prepared_as_array_record_offline():
    """tfds's real imagenet2012 builder, from a generated manual dir to array_record shards,
    read back by index: every training image once, with its label."""
    data_dir, manual_dir, expected = fx.prepared_imagenet()
    shards = [n for _, _, files in os.walk(data_dir) for n in files if '.array_record-' in n]
    assert any('imagenet2012-train.array_record' in n for n in shards)
    source = sources.get_source(fx.data_config(data_dir=data_dir))
    assert isinstance(source, tfds_source.TfdsSource) and source.num_classes == 1000
    assert source.num_examples('train') == 12 and source.num_examples('validation') == 7
    examples = read_all(source.examples('train'))
    ids = [int(fx.identify(tf.io.decode_jpeg(x['image']).numpy()[None], 125)[0]) for x in examples]
    assert sorted(ids) == list(range(12))
    assert [int(x['label']) for x in examples] == [expected[i] for i in ids]
    assert len(read_all(source.examples('train[4:8]'))) == 4  # sub-splits through tfds


def _convert_in_place(version_dir: str) -> None:
    """What ``tfds convert_format --dataset_version_dir=DIR --out_file_format=array_record``
    leaves in DIR, made with the pieces of tfds that command runs per shard and for the
    metadata (the command itself imports apache-beam, which this environment cannot install:
    it pins older pillow and protobuf). The command's own output was checked the same way by
    hand (docs/data.md)."""
    from tensorflow_datasets.core import dataset_info as dataset_info_lib
    from tensorflow_datasets.core import file_adapters

    adapters = file_adapters.ADAPTER_FOR_FORMAT
    tfrecord = adapters[file_adapters.FileFormat.TFRECORD]
    array_record = adapters[file_adapters.FileFormat.ARRAY_RECORD]
    for name in sorted(os.listdir(version_dir)):
        if '.tfrecord-' in name:
            records = tfrecord.make_tf_data(os.path.join(version_dir, name))
            out = os.path.join(version_dir, name.replace('.tfrecord-', '.array_record-'))
            array_record.write_examples(out, enumerate(r.numpy() for r in records))
    info = dataset_info_lib.read_proto_from_builder_dir(version_dir)
    info.alternative_file_formats.append('array_record')
    dataset_info_lib.write_dataset_info_proto(info, dataset_info_dir=version_dir)


def test_tfrecord_dataset_is_refused_then_read_once_converted_in_place(tmp_path):
    """A TFRecord copy is refused in one line that gives the conversion command; converted in
    place (array_record shards beside the TFRecord ones, the format listed in
    dataset_info.json), it is read: the same encoded images and labels as the TFRecord files."""
    import tensorflow_datasets as tfds

    data_dir, manual_dir = str(tmp_path / 'tfds'), str(tmp_path / 'manual')
    fx.write_imagenet_manual_dir(manual_dir, class_ids=(0, 1), per_class=2, num_val=1)
    fx.prepare_imagenet(data_dir, manual_dir, file_format='tfrecord')
    with pytest.raises(ValueError) as err:
        input_pipeline.dataset_info(fx.data_config(data_dir=data_dir))
    message = str(err.value)
    assert '\n' not in message and 'stored as TFRecord' in message
    version_dir = os.path.join(data_dir, 'imagenet2012', '5.1.0')
    assert (
        f'tfds convert_format --dataset_version_dir={version_dir} '
        '--out_file_format=array_record' in message
    )

    _convert_in_place(version_dir)
    source = sources.get_source(fx.data_config(data_dir=data_dir))
    assert source.num_examples('train') == 4 and source.num_examples('validation') == 1
    skip = {'image': tfds.decode.SkipDecoding()}
    for split in ('train', 'validation'):
        records = source.examples(split).read(tf.range(source.num_examples(split), dtype=tf.int64))
        ours = sorted(zip(records['image'].numpy().tolist(), records['label'].numpy().tolist()))
        streamed = tfds.load('imagenet2012', split=split, data_dir=data_dir, decoders=skip)
        want = sorted((x['image'], int(x['label'])) for x in streamed.as_numpy_iterator())
        assert ours == want, split


def test_imagenet2012_missing_says_how_to_prepare(tmp_path):
    config = fx.data_config(data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path / 'none'))
    with pytest.raises(FileNotFoundError) as err:
        input_pipeline.dataset_info(config)
    message = str(err.value)
    assert 'tfds build imagenet2012 --file_format=array_record --manual_dir=' in message
    assert 'ILSVRC2012_img_train.tar' in message and 'image-net.org' in message


def test_fashion_mnist_missing_offline_fails_fast_and_says_how_to_prepare(tmp_path, monkeypatch):
    # An unresolvable host (.invalid never resolves, RFC 2606) stands for a machine without
    # internet: tfds itself would retry for minutes before its ConnectionError.
    monkeypatch.setattr(tfds_source, 'FASHION_MNIST_HOST', 'fashion-mnist.invalid')
    config = fx.data_config(
        name='fashion_mnist',
        num_classes=10,
        data_dir=str(tmp_path / 'tfds'),
        fashion_mnist_dir=str(tmp_path / 'none'),
    )
    started = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        input_pipeline.dataset_info(config)
    assert time.monotonic() - started < 30
    message = str(err.value)
    assert f'tfds build fashion_mnist --data_dir={tmp_path / "tfds"}' in message
    assert 'dataset-fashion-mnist' in message and 'make data' in message
    assert 'fashion_mnist_dir' in message


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason='run `make data` (Debian package)')
def test_fashion_mnist_offline_from_debian_files():
    config = fx.data_config(name='fashion_mnist', num_classes=10, resolution=28, eval_split='test')
    assert input_pipeline.dataset_info(config) == {
        'num_classes': 10, 'num_train': 60000, 'num_eval': 10000,
    }  # fmt: skip
    # Independent of our idx parser: the label file is a 8-byte header then one byte per label.
    with gzip.open(os.path.join(FASHION_DIR, 'train-labels-idx1-ubyte.gz')) as f:
        raw_labels = np.frombuffer(f.read()[8:], np.uint8)
    assert np.bincount(raw_labels).tolist() == [6000] * 10
    with gzip.open(os.path.join(FASHION_DIR, 't10k-images-idx3-ubyte.gz')) as f:
        raw_images = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FASHION_DIR, 't10k-labels-idx1-ubyte.gz')) as f:
        raw_test_labels = np.frombuffer(f.read()[8:], np.uint8)
    config.crop_fraction = 1.0  # eval at 28 px: crop and resize are the identity
    batch = next(input_pipeline.create_eval_iterator(config, global_batch_size=16))
    assert batch['image'].shape == (16, 28, 28, 3)  # grayscale became 3 channels
    np.testing.assert_array_equal(batch['image'][..., 1], raw_images[:16])
    np.testing.assert_array_equal(batch['label'], raw_test_labels[:16])
    train = next(input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0))
    assert train['image'].shape == (8, 28, 28, 3) and train['label'].max() < 10
    # 'validation' maps to Fashion-MNIST's test split
    assert input_pipeline.dataset_info(fx.data_config(name='fashion_mnist'))['num_eval'] == 10000


def test_image_folder_source_and_holdout(tmp_path):
    ids = fx.write_image_folder(str(tmp_path), num_classes=3, per_class=10)
    config = fx.data_config(name='folder', folder=str(tmp_path), resolution=24,
                            holdout_fraction=0.2, num_classes=3)  # fmt: skip
    assert input_pipeline.dataset_info(config) == {'num_classes': 3, 'num_train': 24, 'num_eval': 6}
    batches = list(input_pipeline.create_eval_iterator(config, global_batch_size=4))
    mask = np.concatenate([b['mask'] for b in batches])
    seen = fx.identify(np.concatenate([b['image'] for b in batches])[mask], 30)
    labels = np.concatenate([b['label'] for b in batches])[mask]
    assert list(labels) == [i // 10 for i in seen]  # label = sorted class folder position
    assert sorted(np.bincount(labels).tolist()) == [2, 2, 2]  # stratified holdout
    train_ids = set()
    it = input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0)
    for _ in range(3):
        train_ids |= set(fx.identify(next(it)['image'], 30))
    assert train_ids == set(ids.values()) - set(seen)
    all_config = fx.data_config(name='folder', folder=str(tmp_path), eval_split='all')
    assert input_pipeline.dataset_info(all_config)['num_eval'] == 30


def test_image_folder_with_bad_and_odd_files(tmp_path, caplog):
    root = tmp_path / 'odd'
    fx.write_image_folder(str(root), num_classes=2, per_class=2)
    rgb = Image.fromarray(fx.color_image(20, 30, 40))
    odd = {
        'gray.jpg': fx.encode(rgb.convert('L')),
        'cmyk.jpg': fx.encode(rgb.convert('CMYK')),
        'pic.png': fx.encode(rgb, 'PNG'),
        'gray.png': fx.encode(rgb.convert('LA'), 'PNG'),
        'truncated.jpg': fx.encode(rgb, quality=90)[:300],
        'corrupt.jpg': b'\xff\xd8\xff\xe0' + os.urandom(500),
        'notes.JPEG': b'this is not an image',
        'empty.png': b'',
    }
    for name, data in odd.items():
        (root / 'class_1' / name).write_bytes(data)
    (root / 'class_0' / 'readme.txt').write_text('ignored: not an image extension')
    config = fx.data_config(name='folder', folder=str(root), resolution=16, holdout_fraction=0.0,
                            eval_split='all', num_classes=2)  # fmt: skip
    caplog.set_level(logging.WARNING)
    folder._scan_folder.cache_clear()
    info = input_pipeline.dataset_info(config)
    assert info['num_train'] == 4 + 4 and info['num_eval'] == 8
    warning = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
    assert len(warning) == 1 and 'skipped 4 of 12 files' in warning[0]
    batches = list(input_pipeline.create_eval_iterator(config, global_batch_size=4))
    assert sum(int(b['mask'].sum()) for b in batches) == 8
    assert all(b['image'].shape == (4, 16, 16, 3) for b in batches)
    it = input_pipeline.create_train_iterator(config, global_batch_size=4, seed=0)
    for _ in range(5):  # more than an epoch: never meets a bad file
        assert next(it)['image'].shape == (4, 16, 16, 3)


def test_fake_source_is_deterministic_sized_and_learnable():
    """Example i is a function of i alone: its class's colour plus noise of at most 40."""
    config = fx.data_config(
        name='fake', fake_num_train=10, fake_num_eval=3, num_classes=5, resolution=8
    )
    source = sources.get_source(config)
    assert source.num_examples('train') == 10 and source.num_examples('validation') == 3
    examples = read_all(source.examples('train'))
    again = read_all(sources.get_source(config).examples('train'))
    for a, b in zip(examples, again):
        assert a['image'].shape == (8, 8, 3) and a['image'].dtype == np.uint8
        np.testing.assert_array_equal(a['image'], b['image'])
        assert 0 <= int(a['label']) < 5
    assert len({bytes(x['image'].numpy()) for x in examples}) == 10
    colours = fake.class_colours(5)
    for x in examples:
        offset = x['image'].numpy().astype(np.int32) - colours[int(x['label'])]
        assert np.abs(offset).max() <= fake.NOISE and offset.std() > 10
    assert len({int(x['label']) for x in examples}) >= 3
    validation = [x['image'].numpy() for x in read_all(source.examples('validation'))]
    assert not any(np.array_equal(v, x['image']) for v in validation for x in examples)
    # A batched read of any indices is the examples at those indices.
    some = source.examples('train')
    records = some.read(tf.constant([7, 2, 7], tf.int64))
    for k, i in enumerate([7, 2, 7]):
        got = some.load(row(records, k))
        np.testing.assert_array_equal(got['image'], examples[i]['image'])


def test_split_slicing_on_indexed_sources():
    source = sources.get_source(fx.data_config(name='fake', fake_num_train=100))
    assert source.num_examples('train[:10%]') == 10
    assert source.num_examples('train[20:30]+validation[:5]') == 15
    with pytest.raises(ValueError):
        source.num_examples('nosuchsplit')
