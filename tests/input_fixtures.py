"""Generated data for the input-pipeline tests: JPEG helpers, an ILSVRC2012 manual dir, folders.

Images carry identifiable content: example i is a flat colour `example_color(i)` with mild
noise, so any crop, flip or resize of it still tells which example it was.
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image


def example_color(i: int) -> np.ndarray:
    """A colour per example id, at least 40 apart from every other id's in some channel."""
    return np.array([40 + 40 * (i % 5), 40 + 40 * ((i // 5) % 5), 40 + 40 * ((i // 25) % 5)])


def identify(images: np.ndarray, num_ids: int) -> np.ndarray:
    """The example id whose colour is nearest to each image's mean colour."""
    colors = np.stack([example_color(i) for i in range(num_ids)]).astype(np.float64)
    if len(images) == 0:
        return np.zeros([0], np.int64)
    means = images.reshape(len(images), -1, 3).mean(axis=1)
    return np.argmin(((means[:, None, :] - colors[None]) ** 2).sum(-1), axis=1)


def color_image(i: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + i)
    noise = rng.integers(-6, 7, size=(height, width, 3))
    return np.clip(example_color(i) + noise, 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = 'JPEG', **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tfds_imagenet_files() -> tuple[list[str], list[str]]:
    """(the 1000 wnids in label order, validation wnids in sorted file-name order), from tfds."""
    import tensorflow_datasets as tfds

    root = tfds.core.tfds_path('datasets/imagenet2012')
    wnids = (root / 'labels.txt').read_text().split()
    val = (root / 'validation_labels.txt').read_text().split()
    return wnids, val


def write_imagenet_manual_dir(
    directory: str, class_ids=(0, 1, 500), per_class: int = 4, num_val: int = 7, size=(48, 64)
) -> dict:
    """ILSVRC2012_img_train.tar (per-class <wnid>.tar of JPEGs) and a flat ILSVRC2012_img_val.tar.

    Train example k of class position c has id c·per_class + k; validation image v has id
    100 + v. Returns the expected labels by id.
    """
    wnids, val_wnids = tfds_imagenet_files()
    os.makedirs(directory, exist_ok=True)
    expected = {}
    h, w = size
    with tarfile.open(os.path.join(directory, 'ILSVRC2012_img_train.tar'), 'w') as outer:
        for c, class_id in enumerate(class_ids):
            wnid = wnids[class_id]
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode='w') as inner:
                for k in range(per_class):
                    ident = c * per_class + k
                    expected[ident] = class_id
                    jpeg = encode(color_image(ident, h, w), quality=95)
                    _add_bytes(inner, f'{wnid}_{k}.JPEG', jpeg)
            _add_bytes(outer, f'{wnid}.tar', inner_buf.getvalue())
    with tarfile.open(os.path.join(directory, 'ILSVRC2012_img_val.tar'), 'w') as val:
        for v in range(num_val):
            ident = 100 + v
            expected[ident] = wnids.index(val_wnids[v])
            jpeg = encode(color_image(ident, h + 8 * v, w), quality=95)
            _add_bytes(val, f'ILSVRC2012_val_{v + 1:08d}.JPEG', jpeg)
    return expected


def write_image_folder(root: str, num_classes: int = 3, per_class: int = 5, size=(40, 56)):
    """root/class_<c>/img_<k>.jpg of colour images; returns {(class, k): id}."""
    ids = {}
    for c in range(num_classes):
        os.makedirs(os.path.join(root, f'class_{c}'), exist_ok=True)
        for k in range(per_class):
            ident = c * per_class + k
            ids[(c, k)] = ident
            with open(os.path.join(root, f'class_{c}', f'img_{k}.jpg'), 'wb') as f:
                f.write(encode(color_image(ident, *size), quality=95))
    return ids


def data_config(**overrides):
    """The real `config.data` schema with overrides (unlocked, like a test would build it)."""
    from configs.base import get_data_config

    config = get_data_config()
    for key, value in overrides.items():
        config[key] = value
    return config


def prepare_imagenet(data_dir: str, manual_dir: str, file_format: str = 'array_record') -> None:
    """tfds's real imagenet2012 builder, prepared from `manual_dir` into `data_dir`: what
    `tfds build imagenet2012 --file_format=... --manual_dir=... --data_dir=...` does."""
    import tensorflow_datasets as tfds

    builder = tfds.builder('imagenet2012', data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )


@functools.lru_cache(maxsize=1)
def prepared_imagenet() -> tuple[str, str, dict]:
    """(data_dir, manual_dir, expected labels by id): tfds's real imagenet2012 builder, prepared
    as array_record once per test process from a generated manual dir (removed at exit)."""
    root = tempfile.mkdtemp(prefix='imagenet_fixture_')
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    manual_dir, data_dir = os.path.join(root, 'manual'), os.path.join(root, 'tfds')
    expected = write_imagenet_manual_dir(manual_dir)
    prepare_imagenet(data_dir, manual_dir)
    return data_dir, manual_dir, expected


def distributed_batches_main() -> None:
    """A process of a multi-process pipeline test (tests/test_input_distributed.py): joins the
    others through jax.distributed, builds its train iterator from the process index and count
    jax reports, and saves its local batches. Arguments come as JSON in $INPUT_TEST_ARGS."""
    import json

    import jax

    args = json.loads(os.environ['INPUT_TEST_ARGS'])
    jax.distributed.initialize(
        coordinator_address=args['coordinator'],
        num_processes=args['num_processes'],
        process_id=args['process_id'],
    )
    import input_pipeline

    it = input_pipeline.create_train_iterator(
        data_config(**args['data']),
        global_batch_size=args['global_batch_size'],
        seed=args['seed'],
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_step=args['start_step'],
    )
    batches = [next(it) for _ in range(args['steps'])]
    np.savez(
        args['out'],
        image=np.stack([b['image'] for b in batches]),
        label=np.stack([b['label'] for b in batches]),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    jax.distributed.shutdown()
