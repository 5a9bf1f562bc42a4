"""Converted weights in our own format: one msgpack file (flax.serialization) holding
``{'model': name, 'format_version': 1, 'variables': {'params': ..., 'batch_stats': ...}}``.
Only flax and numpy are needed to read it back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import serialization

from efficientnet import arch, paths

FORMAT_VERSION = 1


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any], name: str) -> None:
    """Writes ``variables`` for model ``name`` to ``path`` (local or gs://) atomically, so a
    reader never sees a half-written file."""
    canonical = arch.get_variant(name).name
    if 'params' not in variables:
        raise ValueError("variables must hold a 'params' collection")
    tree = {k: _to_numpy(v) for k, v in variables.items()}
    data = serialization.msgpack_serialize(
        {'model': canonical, 'format_version': FORMAT_VERSION, 'variables': tree}
    )
    paths.write_atomic(path, data)


def load_variables(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Reads a file written by ``save_variables`` (local or gs://); returns (model name,
    variables)."""
    path = os.fspath(path)
    file = paths.as_path(path)
    if not file.is_file():
        raise FileNotFoundError(f'weights file not found: {path}')
    data = file.read_bytes()
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
