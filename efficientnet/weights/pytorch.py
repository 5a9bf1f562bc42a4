"""PyTorch state dicts in two namings, told apart by their stem: efficientnet_pytorch's
(lukemelas/EfficientNet-PyTorch), which the EfficientNet-Lite ports (efficientnet_lite_pytorch)
share, and timm's (``tf_efficientnetv2_*``, ``tf_efficientnet_*``).

efficientnet_pytorch:

    _conv_stem.weight, _bn0.*                      stem
    _blocks.N._expand_conv.weight, _blocks.N._bn0   expand (only when expand ratio != 1)
    _blocks.N._depthwise_conv.weight, ._bn1         depthwise
    _blocks.N._se_reduce.{weight,bias}, _se_expand  squeeze-excite
    _blocks.N._project_conv.weight, ._bn2           project
    _conv_head.weight, _bn1.*, _fc.{weight,bias}    head

timm (blocks.S.J: stage S, repeat J):
    conv_stem.weight, bn1.*                         stem
    blocks.S.J.conv, .bn1                           Fused-MBConv without expansion (ConvBnAct)
    blocks.S.J.conv_exp, .bn1, .conv_pwl, .bn2      Fused-MBConv (EdgeResidual)
    blocks.S.J.conv_pw, .bn1, .conv_dw, .bn2, .se.conv_reduce, .se.conv_expand, .conv_pwl, .bn3
                                                    MBConv (InvertedResidual)
    blocks.S.J.conv_dw, .bn1, .se.*, .conv_pw, .bn2 MBConv without expansion (DepthwiseSeparable)
    conv_head.weight, bn2.*, classifier.{weight,bias}  head

efficientnet_pytorch, its Lite ports and timm's ``tf_`` models pad like TensorFlow's SAME, so
the result belongs with our default padding='same'; timm's other EfficientNets (without ``tf_``)
pad symmetrically and need ``padding='symmetric'`` (and their BatchNorm epsilon is 1e-5, not
ours).
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

_TIMM_TOP = {
    'stem_conv': 'conv_stem',
    'stem_bn': 'bn1',
    'head_conv': 'conv_head',
    'head_bn': 'bn2',
    'classifier': 'classifier',
}
_TIMM_SE = {'se/reduce': 'se.conv_reduce', 'se/expand': 'se.conv_expand'}
_TIMM_FUSED = {'expand_conv': 'conv_exp', 'expand_bn': 'bn1', 'project_conv': 'conv_pwl',
               'project_bn': 'bn2', **_TIMM_SE}  # fmt: skip
_TIMM_FUSED_NO_EXPAND = {'project_conv': 'conv', 'project_bn': 'bn1'}
_TIMM_MBCONV = {'expand_conv': 'conv_pw', 'expand_bn': 'bn1', 'dw_conv': 'conv_dw', 'dw_bn': 'bn2',
                'project_conv': 'conv_pwl', 'project_bn': 'bn3', **_TIMM_SE}  # fmt: skip
_TIMM_MBCONV_NO_EXPAND = {'dw_conv': 'conv_dw', 'dw_bn': 'bn1', 'project_conv': 'conv_pw',
                          'project_bn': 'bn2', **_TIMM_SE}  # fmt: skip
_TIMM_HEAD_KEYS = ('classifier.weight', 'classifier.bias')
NAMINGS = ('efficientnet_pytorch', 'timm')


def _timm_block_names(spec: arch.BlockSpec) -> dict[str, str]:
    if spec.fused:
        return _TIMM_FUSED if spec.expand != 1 else _TIMM_FUSED_NO_EXPAND
    return _TIMM_MBCONV if spec.expand != 1 else _TIMM_MBCONV_NO_EXPAND


def _timm_block_prefixes(blocks: list[arch.BlockSpec]) -> dict[int, str]:
    """Our block index -> 'blocks.{stage}.{repeat}'."""
    first: dict[int, int] = {}
    out = {}
    for b in blocks:
        first.setdefault(b.stage, b.index)
        out[b.index] = f'blocks.{b.stage}.{b.index - first[b.stage]}'
    return out


def _source_key(path: str, blocks: list[arch.BlockSpec] | None = None) -> str:
    """The state-dict key of our tensor ``path``: efficientnet_pytorch's naming, or timm's when
    ``blocks`` (the model's block list) is given."""
    index, rest = core.block_path(path)
    module, leaf = rest.rsplit('/', 1)
    if blocks is None:
        name = _TOP[module] if index is None else f'_blocks.{index}.{_BLOCK[module]}'
    elif index is None:
        name = _TIMM_TOP[module]
    else:
        prefix = _timm_block_prefixes(blocks)[index]
        name = f'{prefix}.{_timm_block_names(blocks[index])[module]}'
    if module.endswith('_bn'):
        return f'{name}.{_BN_LEAF[leaf]}'
    return f'{name}.{"weight" if leaf == "kernel" else leaf}'


def torch_plan(
    shapes: Mapping[str, tuple[int, ...]], blocks: list[arch.BlockSpec] | None = None
) -> core.Plan:
    """efficientnet_pytorch's naming, or timm's with the model's ``blocks``."""
    plan = {}
    for path in shapes:
        leaf = path.rsplit('/', 1)[-1]
        if path == 'classifier/kernel':
            transform = core.transpose_2d
        elif leaf == 'kernel':
            transform = core.hwio_from_oihw  # every conv, depthwise included
        else:
            transform = core.identity
        plan[path] = (_source_key(path, blocks), transform)
    return plan


def naming(state: Mapping) -> str:
    """'timm' when the state dict has timm's stem ('conv_stem.weight'), else
    'efficientnet_pytorch' (whose strict assembly then names what is missing)."""
    return 'timm' if 'conv_stem.weight' in state else 'efficientnet_pytorch'


def load_state_dict(state_dict_or_file: Any) -> Mapping:
    """The model's own state dict from a ``.pth`` file (read with ``weights_only=True``), a
    ``.safetensors`` file (timm's hub format) or a mapping, unwrapped from a training
    checkpoint's {'state_dict': ...} and from DataParallel's 'module.' prefixes; read a file
    once with it, then pass the result on."""
    if isinstance(state_dict_or_file, (str, os.PathLike)):
        path = os.fspath(state_dict_or_file)
        if not paths.as_path(path).is_file():
            raise FileNotFoundError(f'PyTorch weights file not found: {path}')
        if path.lower().endswith('.safetensors'):
            return _unwrap(_read_safetensors(path))
        import torch

        # torch.load reads local files itself; a gs:// file is read into memory first.
        source = io.BytesIO(paths.as_path(path).read_bytes()) if paths.is_remote(path) else path
        # weights_only: tensors and plain containers only; never unpickle arbitrary objects.
        state = torch.load(source, map_location='cpu', weights_only=True)
    else:
        state = state_dict_or_file
    return _unwrap(state)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load
    except ImportError as e:
        raise ValueError(
            f'reading {path} needs the safetensors package: pip install safetensors'
        ) from e
    return load(paths.as_path(path).read_bytes())


def _unwrap(state: Any) -> Mapping:
    if not isinstance(state, Mapping):
        raise ValueError(
            f'expected a state dict (a mapping of names to tensors), got {type(state).__name__}'
        )
    # Training checkpoints often wrap the weights: {'state_dict': {...}} or {'model': {...}}
    # (timm's train.py: 'state_dict', and 'state_dict_ema', which a caller may pass itself).
    if not any(str(k).endswith('conv_stem.weight') for k in state):
        for wrapper in ('state_dict', 'model', 'model_state_dict'):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    keys = [str(k) for k in state]
    if keys and all(k.startswith('module.') for k in keys):  # saved from DataParallel
        state = {k[len('module.') :]: v for k, v in state.items()}
    return state


def classifier_classes(state_dict_or_file: Any) -> int:
    """Rows of the classifier ('_fc.weight', timm: 'classifier.weight') of a state dict or
    ``.pth`` file; 0 if it has none."""
    state = load_state_dict(state_dict_or_file)
    weight = state.get('_fc.weight', state.get('classifier.weight'))
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
    """Converts an efficientnet_pytorch / efficientnet_lite_pytorch or timm state dict (a
    mapping of tensors or arrays, a ``.pth`` file read with ``weights_only=True``, or a
    ``.safetensors`` file) for model ``name``; the naming is told from the stem's key.

    Returns ``{'params', 'batch_stats'}`` for ``create_model(name, num_classes=num_classes)``,
    or, with ``skip_head``, for ``num_classes=0`` (the source's classifier is dropped). Raises
    ``WeightsMismatchError`` (a ValueError) when any tensor is missing, extra or misshapen.
    """
    canonical = arch.get_variant(name).name
    source = _read(state_dict_or_file)
    shapes = core.target_shapes(canonical, num_classes, skip_head)
    if naming(source) == 'timm':
        plan, head = torch_plan(shapes, core.blocks_of(canonical)), _TIMM_HEAD_KEYS
    else:
        plan, head = torch_plan(shapes), _HEAD_KEYS
    return core.assemble(
        source,
        plan,
        shapes,
        ignored=head if skip_head else (),
        what='PyTorch weights',
        model=canonical,
    )
