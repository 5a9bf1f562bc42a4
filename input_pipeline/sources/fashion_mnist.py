"""Fashion-MNIST from idx files (Debian's `dataset-fashion-mnist`): no network, no tfds."""

from __future__ import annotations

import functools
import gzip
import os
import struct

import numpy as np
import tensorflow as tf

from input_pipeline.sources.base import IndexedSource

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


def read_idx(path: str) -> np.ndarray:
    """Parses a (gzipped) idx file, the MNIST format: magic, dims, then big-endian data. The
    path may be local or gs:// (read through tf.io.gfile)."""
    with tf.io.gfile.GFile(path, 'rb') as f:
        data = f.read()
    if path.endswith('.gz'):
        data = gzip.decompress(data)
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

    def _records(self):
        # In memory (55 MB): a read is a gather.
        records = {'image': tf.constant(self.images), 'label': tf.constant(self.labels)}
        return records, lambda r: r
