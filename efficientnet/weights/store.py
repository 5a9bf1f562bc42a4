"""Converted weights in our own format: one msgpack file (flax.serialization) holding
``{'model': name, 'format_version': 1, 'variables': {'params': ..., 'batch_stats': ...}}``.
Only flax and numpy are needed to read it back.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import serialization

from efficientnet import arch

FORMAT_VERSION = 1


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any], name: str) -> None:
    """Writes ``variables`` for model ``name`` to ``path`` atomically (temp file + rename), so a
    reader never sees a half-written file."""
    canonical = arch.get_variant(name).name
    if 'params' not in variables:
        raise ValueError("variables must hold a 'params' collection")
    tree = {k: _to_numpy(v) for k, v in variables.items()}
    data = serialization.msgpack_serialize(
        {'model': canonical, 'format_version': FORMAT_VERSION, 'variables': tree}
    )
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_variables(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Reads a file written by ``save_variables``; returns (model name, variables)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'weights file not found: {path}')
    with open(path, 'rb') as f:
        data = f.read()
    try:
        content = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(f'{path} is not an efficientnet weights file: {e}') from e
    if not isinstance(content, dict) or 'variables' not in content:
        raise ValueError(f'{path} is not an efficientnet weights file')
    version = content.get('format_version')
    if version != FORMAT_VERSION:
        raise ValueError(f'{path} has format_version {version!r}; this code reads {FORMAT_VERSION}')
    return content['model'], content['variables']


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)
