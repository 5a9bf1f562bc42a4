"""Where examples come from: tfds datasets, an image folder, Debian's Fashion-MNIST, fake data.

Every source hands the pipeline the same thing for a (split, process) pair: a `Shard`, i.e. a
finite `tf.data.Dataset` of *records* in a fixed order, its length, and a `load` function that
turns a record into `{'image': encoded bytes or uint8 [H, W, C], 'label': int32}`. Records are
kept cheap (encoded bytes, file paths, example ids) so shuffling and skipping them on resume
never decodes an image; `load` runs inside the pipeline's parallel map.

Processes get disjoint, contiguous shards whose sizes differ by at most one example.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import logging
import os
import re
import socket
import struct
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
# Where tfds's fashion_mnist builder downloads from (probed first: offline, tfds retries for
# minutes before it fails).
FASHION_MNIST_HOST = 'fashion-mnist.s3-website.eu-central-1.amazonaws.com'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
HOLDOUT_SPLITS = ('validation', 'test', 'holdout')


@dataclasses.dataclass(frozen=True)
class Shard:
    """One process's part of a split."""

    records: tf.data.Dataset
    num_examples: int
    load: Callable[[Any], dict]


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """Reads a field from a ConfigDict or a mapping, with a default for fields a config lacks."""
    if isinstance(config, Mapping) or hasattr(config, 'get'):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None and default is not None else value


def shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of process `process_index`'s contiguous part of n examples."""
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    base, extra = divmod(n, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (1 if process_index < extra else 0)


def _slice_indices(spec: str, split_sizes: dict[str, int]) -> np.ndarray:
    """Indices, in order, selected by a tfds-style split string ('train[:10%]', 'a+b')."""
    infos = {k: types.SimpleNamespace(num_examples=v) for k, v in split_sizes.items()}
    offsets = dict(zip(split_sizes, np.cumsum([0, *split_sizes.values()])))
    parts = []
    for inst in tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos):
        if inst.splitname not in split_sizes:
            raise ValueError(f'unknown split {inst.splitname!r}; have {sorted(split_sizes)}')
        lo = 0 if inst.from_ is None else inst.from_
        hi = split_sizes[inst.splitname] if inst.to is None else inst.to
        parts.append(np.arange(lo, hi) + offsets[inst.splitname])
    return np.concatenate(parts) if parts else np.zeros([0], np.int64)


class Source:
    """A dataset: split sizes, classes, and per-process shards."""

    name: str = ''
    num_classes: int | None = None

    def num_examples(self, split: str) -> int:
        raise NotImplementedError

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        raise NotImplementedError


class IndexedSource(Source):
    """A source whose examples are addressable by an integer index (arrays, file lists, ids)."""

    split_sizes: dict[str, int]
    aliases: dict[str, str] = {}

    def _indices(self, split: str) -> np.ndarray:
        spec = self.aliases.get(split, split)
        if spec != split:
            logger.info('%s: using split %r for %r', self.name, spec, split)
        return _slice_indices(spec, self.split_sizes)

    def num_examples(self, split: str) -> int:
        return len(self._indices(split))

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        indices = self._indices(split)
        lo, hi = shard_bounds(len(indices), process_index, process_count)
        return self._make_shard(indices[lo:hi])

    def _make_shard(self, indices: np.ndarray) -> Shard:
        raise NotImplementedError


# ----------------------------------------------------------------------------- fake


class FakeSource(IndexedSource):
    """Deterministic random uint8 images and labels: a function of (split, example id) only."""

    def __init__(self, num_train: int, num_eval: int, num_classes: int, image_size: int):
        self.name = 'fake'
        self.num_classes = num_classes
        self.image_size = image_size
        self.split_sizes = {'train': num_train, 'validation': num_eval}
        self.aliases = {'test': 'validation'}

    def _make_shard(self, indices: np.ndarray) -> Shard:
        size, num_classes = self.image_size, self.num_classes

        def load(index: tf.Tensor) -> dict:
            seed = tf.stack([tf.constant(20190528, tf.int64), index])
            image = tf.random.stateless_uniform([size, size, 3], seed, 0, 256, tf.int32)
            label = tf.random.stateless_uniform([], seed + 1, 0, num_classes, tf.int32)
            return {'image': tf.cast(image, tf.uint8), 'label': label}

        records = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
        return Shard(records, len(indices), load)


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str) -> np.ndarray:
    """Parses a (gzipped) idx file, the MNIST format: magic, dims, then big-endian data."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f'{path}: not an unsigned-byte idx file')
    shape = struct.unpack(f'>{ndim}I', data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist(directory: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, prefix in (('train', 'train'), ('test', 't10k')):
        images = read_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'))
        labels = read_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'))
        if len(images) != len(labels):
            raise ValueError(f'{directory}: {len(images)} images but {len(labels)} labels')
        out[split] = (images[..., None], labels.astype(np.int32))
    return out


class FashionMnistFiles(IndexedSource):
    """Fashion-MNIST from idx files (Debian's `dataset-fashion-mnist`), no network, no tfds."""

    def __init__(self, directory: str):
        self.name = 'fashion_mnist'
        self.num_classes = 10
        data = _load_fashion_mnist(directory)
        self.images = np.concatenate([data['train'][0], data['test'][0]])
        self.labels = np.concatenate([data['train'][1], data['test'][1]])
        self.split_sizes = {'train': len(data['train'][0]), 'test': len(data['test'][0])}
        self.aliases = {'validation': 'test'}  # Fashion-MNIST has no validation split

    def _make_shard(self, indices: np.ndarray) -> Shard:
        records = tf.data.Dataset.from_tensor_slices(
            {'image': self.images[indices], 'label': self.labels[indices]}
        )
        return Shard(records, len(indices), lambda r: r)


# ----------------------------------------------------------------------------- image folder


def _valid_files(paths: list[str]) -> set[str]:
    """The paths TensorFlow can decode to an image. Bad files are dropped, never fatal."""
    ds = tf.data.Dataset.from_tensor_slices(paths)

    def check(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return path, tf.shape(image)[0]

    ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    return {p.decode() for p, _ in ds.as_numpy_iterator()}


@functools.lru_cache(maxsize=4)
def _scan_folder(root: str) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """(class names, ((path, label), ...)) of the decodable images under root/<class>/."""
    classes = tuple(sorted(d.name for d in os.scandir(root) if d.is_dir()))
    if not classes:
        raise ValueError(f'image folder {root!r} has no class subfolders')
    files = []
    for label, name in enumerate(classes):
        for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name))):
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((os.path.join(dirpath, fn), label))
    valid = _valid_files([p for p, _ in files]) if files else set()
    bad = [p for p, _ in files if p not in valid]
    if bad:
        logger.warning(
            'image folder %s: skipped %d of %d files that do not decode (corrupt, truncated or '
            'not an image): %s%s',
            root,
            len(bad),
            len(files),
            ', '.join(os.path.relpath(p, root) for p in bad[:5]),
            ' ...' if len(bad) > 5 else '',
        )
    return classes, tuple((p, lbl) for p, lbl in files if p in valid)


def _stable_rank(root: str, path: str) -> str:
    return hashlib.md5(os.path.relpath(path, root).encode()).hexdigest()


class ImageFolder(IndexedSource):
    """root/<class>/<image>: JPEG, PNG, BMP or GIF. Labels are sorted class-folder positions.

    Split 'train' is the folder minus a held-out part; 'validation' (also 'test', 'holdout') is
    round(holdout_fraction × n) images of each class, chosen by a hash of the file's relative
    path, so the split is stable and the same on every host. 'all' is everything.
    """

    def __init__(self, root: str, holdout_fraction: float):
        self.name = 'folder'
        self.root = os.path.abspath(root)
        self.classes, files = _scan_folder(self.root)
        self.num_classes = len(self.classes)
        by_class: dict[int, list[str]] = {}
        for path, label in files:
            by_class.setdefault(label, []).append(path)
        train, holdout = [], []
        for label, paths in sorted(by_class.items()):
            paths = sorted(paths, key=lambda p: _stable_rank(self.root, p))
            k = int(round(holdout_fraction * len(paths)))
            holdout += [(p, label) for p in sorted(paths[:k])]
            train += [(p, label) for p in sorted(paths[k:])]
        self.files = train + holdout
        self.split_sizes = {'train': len(train), 'validation': len(holdout)}
        self.aliases = {s: 'validation' for s in HOLDOUT_SPLITS[1:]} | {'all': 'train+validation'}

    def _make_shard(self, indices: np.ndarray) -> Shard:
        paths = [self.files[i][0] for i in indices]
        labels = np.array([self.files[i][1] for i in indices], np.int32)
        records = tf.data.Dataset.from_tensor_slices(
            {'path': tf.constant(paths, tf.string, shape=[len(paths)]), 'label': labels}
        )
        load = lambda r: {'image': tf.io.read_file(r['path']), 'label': r['label']}
        return Shard(records, len(indices), load)


# ----------------------------------------------------------------------------- tfds


def _imagenet_missing_message(data_dir: str | None, manual_dir: str | None) -> str:
    data_flag = f' --data_dir={data_dir}' if data_dir else ''
    where = manual_dir or '/path/to/ilsvrc'
    return (
        f'tfds dataset imagenet2012 is not prepared in {data_dir or "the default tfds data_dir"}'
        f'{f" and {manual_dir} lacks ILSVRC2012_img_train.tar" if manual_dir else ""}.\n'
        'ImageNet cannot be downloaded automatically. To prepare it:\n'
        '  1. Register at https://image-net.org/download-images and download\n'
        f'     ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into {where}\n'
        '  2. Run (once, a few hours, ~150 GB written):\n'
        f'     tfds build imagenet2012 --manual_dir={where}{data_flag}\n'
        f'  or set config.data.manual_dir={where} and the pipeline prepares it on first use.'
    )


class TfdsSource(Source):
    """Any tfds image-classification dataset; images stay encoded until the pipeline's map."""

    def __init__(self, name, data_dir=None, manual_dir=None, image_key='image', label_key='label'):
        self.name = name
        self.image_key, self.label_key = image_key, label_key
        self.builder = tfds.builder(name, data_dir=data_dir)
        if not _is_prepared(self.builder):
            self._prepare(name, data_dir, manual_dir)
        features = self.builder.info.features
        if label_key in features and hasattr(features[label_key], 'num_classes'):
            self.num_classes = features[label_key].num_classes
        self._encoded = isinstance(features[image_key], tfds.features.Image)

    def _prepare(self, name, data_dir, manual_dir):
        if name.split('/')[0].split(':')[0] == 'imagenet2012':
            train_tar = os.path.join(manual_dir or '', 'ILSVRC2012_img_train.tar')
            if not manual_dir or not os.path.exists(train_tar):
                raise FileNotFoundError(_imagenet_missing_message(data_dir, manual_dir))
        fashion = name.split(':')[0] == 'fashion_mnist'
        if fashion and not _resolvable(FASHION_MNIST_HOST):
            raise FileNotFoundError(_download_failed_message(
                name, data_dir, f'{FASHION_MNIST_HOST} cannot be resolved: offline?'))
        logger.info('preparing tfds dataset %s (manual_dir=%s)', name, manual_dir)
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        try:
            self.builder.download_and_prepare(download_config=download_config)
        except (OSError, tfds.core.download.DownloadError) as e:  # requests' errors are OSErrors
            raise FileNotFoundError(_download_failed_message(name, data_dir, e)) from e

    def num_examples(self, split: str) -> int:
        return self.builder.info.splits[split].num_examples

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        subsplit = tfds.even_splits(split, n=process_count)[process_index]
        decoders = {self.image_key: tfds.decode.SkipDecoding()} if self._encoded else None
        read_config = tfds.ReadConfig(try_autocache=False, skip_prefetch=True)
        ds = self.builder.as_dataset(
            split=subsplit, shuffle_files=False, decoders=decoders, read_config=read_config
        )
        image_key, label_key = self.image_key, self.label_key
        records = ds.map(
            lambda ex: {'image': ex[image_key], 'label': tf.cast(ex[label_key], tf.int32)}
        )
        return Shard(records, self.builder.info.splits[subsplit].num_examples, lambda r: r)


def _resolvable(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 80)
        return True
    except OSError:
        return False


def _download_failed_message(name: str, data_dir: str | None, error: Any) -> str:
    data_flag = f' --data_dir={data_dir}' if data_dir else ''
    lines = [
        f'tfds dataset {name} is not prepared in {data_dir or "the default tfds data_dir"} and '
        f'could not be downloaded ({error}).',
        f'Prepare it on a machine with internet access: tfds build {name}{data_flag}',
        '  then copy the data_dir here (config.data.data_dir names it).',
    ]
    if name.split(':')[0] == 'fashion_mnist':
        lines.append(
            "Or, offline: install Debian's dataset-fashion-mnist package (`make data`), or set "
            'config.data.fashion_mnist_dir to a directory holding the four idx .gz files.')
    return '\n'.join(lines)


def _is_prepared(builder) -> bool:
    try:
        return builder.is_prepared()
    except AttributeError:  # older tfds
        return tf.io.gfile.exists(os.path.join(builder.data_dir, 'dataset_info.json'))


# ----------------------------------------------------------------------------- factory


def get_source(config: Any) -> Source:
    """The source named by `config.name` (see docs/interfaces.md)."""
    name = cfg_get(config, 'name', 'imagenet2012')
    if name == 'fake':
        return FakeSource(
            cfg_get(config, 'fake_num_train', 1024),
            cfg_get(config, 'fake_num_eval', 256),
            cfg_get(config, 'num_classes', 1000),
            cfg_get(config, 'resolution', 224),
        )
    if name == 'folder':
        root = cfg_get(config, 'folder')
        if not root:
            raise ValueError("config.data.folder must name a directory for name='folder'")
        return ImageFolder(root, cfg_get(config, 'holdout_fraction', 0.1))
    if re.fullmatch(r'fashion_mnist(:[\d.]+)?', name):
        directory = cfg_get(config, 'fashion_mnist_dir', DEBIAN_FASHION_MNIST_DIR)
        if os.path.exists(os.path.join(directory, 'train-images-idx3-ubyte.gz')):
            return FashionMnistFiles(directory)
        logger.info('no idx files in %s; using the tfds fashion_mnist builder', directory)
    return TfdsSource(
        name,
        data_dir=cfg_get(config, 'data_dir'),
        manual_dir=cfg_get(config, 'manual_dir'),
        image_key=cfg_get(config, 'image_key', 'image'),
        label_key=cfg_get(config, 'label_key', 'label'),
    )
