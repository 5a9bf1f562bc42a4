"""Any tfds image-classification dataset, prepared on first use where that can work offline,
else failing at once with how to prepare it."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline.sources.base import Shard, Source

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
            if not manual_dir or not tf.io.gfile.exists(train_tar):
                raise FileNotFoundError(_imagenet_missing_message(data_dir, manual_dir))
        fashion = name.split(':')[0] == 'fashion_mnist'
        if fashion and not _resolvable(FASHION_MNIST_HOST):
            raise FileNotFoundError(
                _download_failed_message(
                    name, data_dir, f'{FASHION_MNIST_HOST} cannot be resolved: offline?'
                )
            )
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
            'config.data.fashion_mnist_dir to a directory holding the four idx .gz files.'
        )
    return '\n'.join(lines)


def _is_prepared(builder) -> bool:
    try:
        return builder.is_prepared()
    except AttributeError:  # older tfds
        return tf.io.gfile.exists(os.path.join(builder.data_dir, 'dataset_info.json'))
