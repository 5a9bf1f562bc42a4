"""An image folder, root/<class>/<image>, with a stable hash-chosen held-out split. The root may
be local or gs:// (listed and read through tf.io.gfile)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os

import tensorflow as tf

from input_pipeline.sources.base import IndexedSource

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
HOLDOUT_SPLITS = ('validation', 'test', 'holdout')


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
    # gfile lists a gs:// subdirectory with a trailing '/'.
    entries = [n.rstrip('/') for n in tf.io.gfile.listdir(root)]
    classes = tuple(sorted(n for n in entries if tf.io.gfile.isdir(os.path.join(root, n))))
    if not classes:
        raise ValueError(f'image folder {root!r} has no class subfolders')
    files = []
    for label, name in enumerate(classes):
        for dirpath, _, filenames in sorted(tf.io.gfile.walk(os.path.join(root, name))):
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
        self.root = root if '://' in root else os.path.abspath(root)  # a URL stays one
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

    def _records(self):
        paths = [p for p, _ in self.files]
        records = {
            'path': tf.constant(paths, tf.string, shape=[len(paths)]),
            'label': tf.constant([lbl for _, lbl in self.files], tf.int32, shape=[len(paths)]),
        }
        # The file is read in the parallel map, with the decoding.
        load = lambda r: {'image': tf.io.read_file(r['path']), 'label': r['label']}
        return records, load
