"""ImageNet-1k class names, shipped with the package (``imagenet_classes.txt``).

Label i is the i-th WordNet id in sorted order, which is tfds ``imagenet2012``'s label order
(the official TFRecords counted from 1; docs/reference.md §5). The file's header line says where the
names come from.
"""

from __future__ import annotations

import functools
import os

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet_classes.txt')


@functools.lru_cache(maxsize=1)
def _read() -> tuple[tuple[str, ...], tuple[str, ...]]:
    wnids, names = [], []
    with open(_PATH, encoding='utf-8') as f:
        for line in f:
            line = line.rstrip('\n')
            if not line or line.startswith('#'):
                continue
            wnid, name = line.split('\t', 1)
            wnids.append(wnid)
            names.append(name)
    return tuple(wnids), tuple(names)


def imagenet_class_names() -> list[str]:
    """The 1000 human-readable names ('tench', 'goldfish', ...), indexed by label id."""
    return list(_read()[1])


def imagenet_wnids() -> list[str]:
    """The 1000 WordNet ids ('n01440764', ...), indexed by label id."""
    return list(_read()[0])
