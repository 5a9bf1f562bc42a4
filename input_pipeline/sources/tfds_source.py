"""Any tfds image-classification dataset in the array_record format (random access), prepared
on first use where that can work offline, else failing at once with how to prepare it.

A dataset prepared as TFRecord can only be streamed in file order, which cannot give the global
order (`order.py`): it is refused with the command that converts it in place.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline.sources.base import Examples, Source

logger = logging.getLogger(__name__)

# Where tfds's fashion_mnist builder downloads from (probed first: offline, tfds retries for
# minutes before it fails).
FASHION_MNIST_HOST = 'fashion-mnist.s3-website.eu-central-1.amazonaws.com'


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
        f'     tfds build imagenet2012 --file_format=array_record --manual_dir={where}{data_flag}\n'
        f'  or set config.data.manual_dir={where} and the pipeline prepares it on first use.'
    )


ARRAY_RECORD = 'array_record'


def _tfrecord_message(name: str, version_dir: str) -> str:
    return (
        f'tfds dataset {name} in {version_dir} is stored as TFRecord, which can only be streamed '
        'in file order, not read in the global random order training uses; convert it once, in '
        f'place: tfds convert_format --dataset_version_dir={version_dir} '
        f'--out_file_format={ARRAY_RECORD} (needs apache-beam importable; see docs/data.md)'
    )


class TfdsSource(Source):
    """Any tfds image-classification dataset stored as array_record (natively, or converted in
    place from TFRecord); images stay encoded until the pipeline's map."""

    def __init__(self, name, data_dir=None, manual_dir=None, image_key='image', label_key='label'):
        self.name = name
        self.image_key, self.label_key = image_key, label_key
        self.builder = tfds.builder(name, data_dir=data_dir)
        if not _is_prepared(self.builder):
            self.builder = tfds.builder(name, data_dir=data_dir, file_format=ARRAY_RECORD)
            self._prepare(name, data_dir, manual_dir)
        info = self.builder.info
        if getattr(info.file_format, 'value', info.file_format) != ARRAY_RECORD:
            # Prepared as TFRecord, perhaps converted in place since: only a builder read from
            # the directory sees the converted format (the code's builder lists TFRecord only).
            self.builder = tfds.builder_from_directory(self.builder.data_dir)
            formats = self.builder.info.available_file_formats()
            if ARRAY_RECORD not in {getattr(f, 'value', f) for f in formats}:
                raise ValueError(_tfrecord_message(name, str(self.builder.data_dir)))
        features = self.builder.info.features
        if label_key in features and hasattr(features[label_key], 'num_classes'):
            self.num_classes = features[label_key].num_classes
        for key in (image_key, label_key):
            if key not in features:
                raise ValueError(f'tfds dataset {name} has no feature {key!r}: {list(features)}')

    def _prepare(self, name, data_dir, manual_dir):
        if name.split('/')[0].split(':')[0] == 'imagenet2012':
            train_tar = os.path.join(manual_dir or '', 'ILSVRC2012_img_train.tar')
            if not manual_dir or not tf.io.gfile.exists(train_tar):
                raise FileNotFoundError(_imagenet_missing_message(data_dir, manual_dir))
        fashion = name.split(':')[0] == 'fashion_mnist'
        if fashion and not _resolvable(FASHION_MNIST_HOST):
            raise FileNotFoundError(
                _download_failed_message(
                    name, data_dir, f'{FASHION_MNIST_HOST} cannot be resolved: offline?'
                )
            )
        logger.info('preparing tfds dataset %s as array_record (manual_dir=%s)', name, manual_dir)
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        try:
            self.builder.download_and_prepare(download_config=download_config)
        except (OSError, tfds.core.download.DownloadError) as e:  # requests' errors are OSErrors
            raise FileNotFoundError(_download_failed_message(name, data_dir, e)) from e

    def num_examples(self, split: str) -> int:
        return self.builder.info.splits[split].num_examples

    def examples(self, split: str) -> Examples:
        """The split by index, from its array_record shards (through tfds's file instructions,
        so sub-splits work)."""
        raw = self.builder.as_data_source(split=split, file_format=ARRAY_RECORD).data_source
        features = self.builder.info.features
        return serialized_examples(
            raw, features[self.image_key], features[self.label_key], self.image_key, self.label_key
        )


def serialized_examples(raw, image_feature, label_feature, image_key='image', label_key='label'):
    """`Examples` over a random-access source of serialized tf.train.Examples (`raw[i]` bytes,
    `raw.__getitems__(indices)`), such as array_record's `ArrayRecordDataSource`: one Python
    call per batch of indices, parsed in the graph; tfds features say how."""
    spec = {}
    for key, feature in ((image_key, image_feature), (label_key, label_feature)):
        info = feature.get_serialized_info()
        spec[key] = tf.io.FixedLenFeature(info.shape, info.dtype)
    encoded = isinstance(image_feature, tfds.features.Image)

    def fetch(ids: np.ndarray) -> np.ndarray:
        return np.array(raw.__getitems__(ids.tolist()), dtype=object)

    def read(ids: tf.Tensor) -> dict:
        serialized = tf.numpy_function(fetch, [ids], tf.string, stateful=False)
        parsed = tf.io.parse_example(tf.reshape(serialized, tf.shape(ids)), spec)
        return {'image': parsed[image_key], 'label': parsed[label_key]}

    def load(record: dict) -> dict:
        image = record['image']
        if not encoded:
            image = image_feature.decode_example(image)
        label = label_feature.decode_example(record['label'])
        return {'image': image, 'label': tf.cast(label, tf.int32)}

    return Examples(len(raw), read, load)


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
            'config.data.fashion_mnist_dir to a directory holding the four idx .gz files.'
        )
    return '\n'.join(lines)


def _is_prepared(builder) -> bool:
    try:
        return builder.is_prepared()
    except AttributeError:  # older tfds
        return tf.io.gfile.exists(os.path.join(builder.data_dir, 'dataset_info.json'))
