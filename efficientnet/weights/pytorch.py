"""PyTorch state dicts in the efficientnet_pytorch naming (lukemelas/EfficientNet-PyTorch), which
the EfficientNet-Lite ports (efficientnet_lite_pytorch) share.

    _conv_stem.weight, _bn0.*                      stem
    _blocks.N._expand_conv.weight, _blocks.N._bn0   expand (only when expand ratio != 1)
    _blocks.N._depthwise_conv.weight, ._bn1         depthwise
    _blocks.N._se_reduce.{weight,bias}, _se_expand  squeeze-excite
    _blocks.N._project_conv.weight, ._bn2           project
    _conv_head.weight, _bn1.*, _fc.{weight,bias}    head

Those ports pad like TensorFlow's SAME, so the result belongs with our default padding='same'.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from efficientnet import arch, paths
from efficientnet.weights import core

_TOP = {
    'stem_conv': '_conv_stem',
    'stem_bn': '_bn0',
    'head_conv': '_conv_head',
    'head_bn': '_bn1',
    'classifier': '_fc',
}
_BLOCK = {
    'expand_conv': '_expand_conv',
    'expand_bn': '_bn0',
    'dw_conv': '_depthwise_conv',
    'dw_bn': '_bn1',
    'se/reduce': '_se_reduce',
    'se/expand': '_se_expand',
    'project_conv': '_project_conv',
    'project_bn': '_bn2',
}
_BN_LEAF = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
_HEAD_KEYS = ('_fc.weight', '_fc.bias')


def _source_key(path: str) -> str:
    index, rest = core.block_path(path)
    module, leaf = rest.rsplit('/', 1)
    if index is None:
        name = _TOP[module]
    else:
        name = f'_blocks.{index}.{_BLOCK[module]}'
    if module.endswith('_bn'):
        return f'{name}.{_BN_LEAF[leaf]}'
    return f'{name}.{"weight" if leaf == "kernel" else leaf}'


def torch_plan(shapes: Mapping[str, tuple[int, ...]]) -> core.Plan:
    plan = {}
    for path in shapes:
        leaf = path.rsplit('/', 1)[-1]
        if path == 'classifier/kernel':
            transform = core.transpose_2d
        elif leaf == 'kernel':
            transform = core.hwio_from_oihw  # every conv, depthwise included
        else:
            transform = core.identity
        plan[path] = (_source_key(path), transform)
    return plan


def load_state_dict(state_dict_or_file: Any) -> Mapping:
    """The model's own state dict from a ``.pth`` file (read with ``weights_only=True``) or a
    mapping, unwrapped from a training checkpoint's {'state_dict': ...} and from DataParallel's
    'module.' prefixes; read a file once with it, then pass the result on."""
    if isinstance(state_dict_or_file, (str, os.PathLike)):
        path = os.fspath(state_dict_or_file)
        if not paths.as_path(path).is_file():
            raise FileNotFoundError(f'PyTorch weights file not found: {path}')
        import torch

        # torch.load reads local files itself; a gs:// file is read into memory first.
        source = io.BytesIO(paths.as_path(path).read_bytes()) if paths.is_remote(path) else path
        # weights_only: tensors and plain containers only; never unpickle arbitrary objects.
        state = torch.load(source, map_location='cpu', weights_only=True)
    else:
        state = state_dict_or_file
    if not isinstance(state, Mapping):
        raise ValueError(
            f'expected a state dict (a mapping of names to tensors), got {type(state).__name__}'
        )
    # Training checkpoints often wrap the weights: {'state_dict': {...}} or {'model': {...}}.
    if not any('_conv_stem' in str(k) for k in state):
        for wrapper in ('state_dict', 'model', 'model_state_dict'):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    keys = [str(k) for k in state]
    if keys and all(k.startswith('module.') for k in keys):  # saved from DataParallel
        state = {k[len('module.') :]: v for k, v in state.items()}
    return state


def classifier_classes(state_dict_or_file: Any) -> int:
    """Rows of the classifier ('_fc.weight') of a state dict or ``.pth`` file; 0 if it has none."""
    weight = load_state_dict(state_dict_or_file).get('_fc.weight')
    return 0 if weight is None else int(weight.shape[0])


def _read(state_dict_or_file: Any) -> dict[str, np.ndarray]:
    out = {}
    for key, value in load_state_dict(state_dict_or_file).items():
        if str(key).endswith('num_batches_tracked'):
            continue
        if hasattr(value, 'detach'):  # a torch.Tensor
            value = value.detach().cpu().float().numpy()
        out[str(key)] = np.asarray(value)
    return out


def from_torch(
    state_dict_or_file: Any, name: str, *, num_classes: int = 1000, skip_head: bool = False
) -> dict[str, dict]:
    """Converts an efficientnet_pytorch / efficientnet_lite_pytorch state dict (a mapping of
    tensors or arrays, or a ``.pth`` file read with ``weights_only=True``) for model ``name``.

    Returns ``{'params', 'batch_stats'}`` for ``create_model(name, num_classes=num_classes)``,
    or, with ``skip_head``, for ``num_classes=0`` (the source's ``_fc`` is dropped). Raises
    ``WeightsMismatchError`` (a ValueError) when any tensor is missing, extra or misshapen.
    """
    canonical = arch.get_variant(name).name
    source = _read(state_dict_or_file)
    shapes = core.target_shapes(canonical, num_classes, skip_head)
    return core.assemble(
        source,
        torch_plan(shapes),
        shapes,
        ignored=_HEAD_KEYS if skip_head else (),
        what='PyTorch weights',
        model=canonical,
    )
