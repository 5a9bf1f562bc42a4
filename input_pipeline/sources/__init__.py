"""Where examples come from: tfds datasets, an image folder, Debian's Fashion-MNIST, fake data.

`get_source(config.data)` picks one; each hands the pipeline `Shard`s of cheap records
(`base.py`).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import tensorflow as tf

from input_pipeline.sources.base import Source, cfg_get
from input_pipeline.sources.fake import FakeSource
from input_pipeline.sources.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, FashionMnistFiles
from input_pipeline.sources.folder import ImageFolder
from input_pipeline.sources.tfds_source import TfdsSource

logger = logging.getLogger(__name__)


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
        if tf.io.gfile.exists(os.path.join(directory, 'train-images-idx3-ubyte.gz')):
            return FashionMnistFiles(directory)
        logger.info('no idx files in %s; using the tfds fashion_mnist builder', directory)
    return TfdsSource(
        name,
        data_dir=cfg_get(config, 'data_dir'),
        manual_dir=cfg_get(config, 'manual_dir'),
        image_key=cfg_get(config, 'image_key', 'image'),
        label_key=cfg_get(config, 'label_key', 'label'),
    )
