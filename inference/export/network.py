"""The trained network as plain arrays, for writers that rebuild it in another op set.

``fold_network`` reads the flax variables of an ``EfficientNet`` module along its own block list
(``arch.build_blocks``) and folds every inference BatchNorm into the convolution before it:
``conv(x, W) * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)`` becomes
``conv(x, W * s) + b``. ``forward`` then walks the folded network with any ``Ops``
implementation, so the TensorFlow graph (TFLite) and the ONNX graph share one walk.

The dataclasses are jax pytrees (arrays as leaves, strides and names as static data), so that
quantisation-aware training (``quant.py``) can differentiate through a folded network;
``network_to_dict`` / ``network_from_dict`` turn one into nested dicts for msgpack and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet import arch
from efficientnet.layers import pad_amounts

BN_EPSILON = 1e-3  # efficientnet.layers.BatchNorm's default, used by every BatchNorm in the model


@dataclasses.dataclass(frozen=True)
class Conv:
    """A convolution with its BatchNorm folded in. ``kernel`` is HWIO for a dense conv and
    (k, k, C) for a depthwise one; ``activation`` is 'swish', 'relu6', 'relu' or None."""

    kernel: np.ndarray
    bias: np.ndarray
    stride: int
    activation: str | None

    @property
    def size(self) -> int:
        return int(self.kernel.shape[0])


@dataclasses.dataclass(frozen=True)
class SqueezeExcite:
    """mean -> 1x1 (reduce_kernel [C, r], bias) -> act -> 1x1 (expand_kernel [r, C]) -> sigmoid."""

    reduce_kernel: np.ndarray
    reduce_bias: np.ndarray
    expand_kernel: np.ndarray
    expand_bias: np.ndarray
    activation: str


@dataclasses.dataclass(frozen=True)
class Block:
    """MBConv: [expand 1x1] -> depthwise (stride) -> [SE] -> project 1x1. Fused-MBConv
    (EfficientNetV2): expand k x k (stride) -> [SE] -> project 1x1, or without expansion one
    project k x k conv (stride) with its activation; no depthwise conv."""

    expand: Conv | None
    depthwise: Conv | None
    se: SqueezeExcite | None
    project: Conv
    residual: bool


@dataclasses.dataclass(frozen=True)
class FoldedNetwork:
    """Everything a writer needs: input facts, the folded layers and the classifier."""

    name: str
    resolution: int
    padding: str  # 'same' (TensorFlow SAME) or 'symmetric'
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stem: Conv
    blocks: tuple[Block, ...]
    head: Conv
    classifier_kernel: np.ndarray  # [features, classes]
    classifier_bias: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.classifier_kernel.shape[1])

    def pads(self, size: int, kernel: int, stride: int) -> tuple[int, int]:
        """(low, high) padding of one spatial axis of ``size`` pixels, as the JAX model pads."""
        return pad_amounts(size, kernel, stride, self.padding)


for _cls, _meta in (
    (Conv, ('stride', 'activation')),
    (SqueezeExcite, ('activation',)),
    (Block, ('residual',)),
    (FoldedNetwork, ('name', 'resolution', 'padding', 'mean', 'std')),
):
    jax.tree_util.register_dataclass(
        _cls,
        data_fields=[f.name for f in dataclasses.fields(_cls) if f.name not in _meta],
        meta_fields=list(_meta),
    )


def network_to_dict(net: FoldedNetwork) -> dict:
    """Nested dicts of numpy arrays, str, int, float and None (what msgpack stores)."""

    def convert(obj):
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple):
            return {str(i): convert(v) for i, v in enumerate(obj)}
        if isinstance(obj, (np.ndarray, jax.Array)):
            return np.asarray(obj, np.float32)
        return obj

    return convert(net)


def network_from_dict(d: dict) -> FoldedNetwork:
    """The inverse of ``network_to_dict``."""

    def conv(c):
        return (
            None
            if c is None
            else Conv(_f32(c['kernel']), _f32(c['bias']), int(c['stride']), c['activation'])
        )

    def se(q):
        if q is None:
            return None
        arrays = [
            _f32(q[k]) for k in ('reduce_kernel', 'reduce_bias', 'expand_kernel', 'expand_bias')
        ]
        return SqueezeExcite(*arrays, q['activation'])

    blocks = tuple(
        Block(
            conv(b['expand']),
            conv(b['depthwise']),
            se(b['se']),
            conv(b['project']),
            bool(b['residual']),
        )
        for _, b in sorted(d['blocks'].items(), key=lambda kv: int(kv[0]))
    )
    return FoldedNetwork(
        name=d['name'],
        resolution=int(d['resolution']),
        padding=d['padding'],
        mean=tuple(float(d['mean'][str(i)]) for i in range(3)),
        std=tuple(float(d['std'][str(i)]) for i in range(3)),
        stem=conv(d['stem']),
        blocks=blocks,
        head=conv(d['head']),
        classifier_kernel=_f32(d['classifier_kernel']),
        classifier_bias=_f32(d['classifier_bias']),
    )


class Ops(Protocol):
    """What ``forward`` needs from an op set; ``x`` is whatever tensor type the writer uses."""

    def normalize(self, images: Any, mean: tuple, std: tuple) -> Any: ...
    def conv(self, x: Any, layer: Conv, size: int) -> Any: ...
    def depthwise(self, x: Any, layer: Conv, size: int) -> Any: ...
    def squeeze_excite(self, x: Any, se: SqueezeExcite) -> Any: ...
    def add(self, x: Any, y: Any) -> Any: ...
    def classify(self, x: Any, kernel: np.ndarray, bias: np.ndarray) -> tuple[Any, Any]: ...


def forward(ops: Ops, net: FoldedNetwork, images: Any) -> tuple[Any, Any]:
    """uint8 NHWC images -> (logits, probabilities), built with ``ops``. ``size`` tracks the
    static spatial size so that each writer can pad exactly as ``pad_amounts`` does."""
    size = net.resolution
    x = ops.normalize(images, net.mean, net.std)
    x = ops.conv(x, net.stem, size)
    size = _out_size(size, net.stem, net)
    for block in net.blocks:
        inputs = x
        if block.expand is not None:
            x = ops.conv(x, block.expand, size)
            size = _out_size(size, block.expand, net)
        if block.depthwise is not None:
            x = ops.depthwise(x, block.depthwise, size)
            size = _out_size(size, block.depthwise, net)
        if block.se is not None:
            x = ops.squeeze_excite(x, block.se)
        x = ops.conv(x, block.project, size)
        size = _out_size(size, block.project, net)
        if block.residual:
            x = ops.add(x, inputs)
    x = ops.conv(x, net.head, size)
    return ops.classify(x, net.classifier_kernel, net.classifier_bias)


def _out_size(size: int, layer: Conv, net: FoldedNetwork) -> int:
    lo, hi = net.pads(size, layer.size, layer.stride)
    return (size + lo + hi - layer.size) // layer.stride + 1


def resolve_normalization(
    normalization: str | tuple | None, variant: arch.Variant
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A name from ``efficientnet.normalization.NORMALIZATIONS``, an explicit (mean, std) pair, or
    None for the variant's own (ImageNet mean/std; (x - 127) / 128 for Lite; (x - 128) / 128 for
    V2-S/M/L/XL)."""
    from efficientnet.normalization import NORMALIZATIONS

    if normalization is None:
        return tuple(variant.mean), tuple(variant.std)
    if isinstance(normalization, str):
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f'normalization must be one of {sorted(NORMALIZATIONS)} or a (mean, std) '
                f'pair, got {normalization!r}'
            )
        mean, std = NORMALIZATIONS[normalization]
    else:
        mean, std = normalization
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f'mean and std need 3 values each, std > 0; got {mean}, {std}')
    return mean, std


def check_exportable(model: Any, variables: Mapping[str, Any], resolution: int) -> None:
    """Raises ValueError unless ``model`` is an inference classifier and ``variables`` hold
    exactly its tensors with its shapes (names the first offenders: weights of another
    variant fail here, not deep inside a converter)."""
    if getattr(model, 'features_only', False) or model.num_classes < 1:
        raise ValueError(
            'export needs a classifier (num_classes > 0, features_only=False): the exported '
            'function returns logits and probabilities'
        )
    if model.bn_group_size is not None:
        raise ValueError(
            'export uses the moving BatchNorm statistics; build the model with bn_group_size=None'
        )
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f'resolution must be an int >= 8, got {resolution!r}')
    x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), x)
    want = _shapes(dict(expected))
    have = _shapes(variables)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(
        f'{k} {have[k]} != {want[k]}' for k in set(want) & set(have) if want[k] != have[k]
    )
    if missing or extra or wrong:
        parts = [
            f'{len(v)} {kind}: {", ".join(v[:3])}'
            for kind, v in (('missing', missing), ('unexpected', extra), ('misshapen', wrong))
            if v
        ]
        raise ValueError(
            f'the variables do not fit {model.variant.name} with '
            f'{model.num_classes} classes: ' + '; '.join(parts)
        )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {
        jax.tree_util.keystr(p): tuple(np.shape(v))
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def fold_network(
    model: Any,
    variables: Mapping[str, Any],
    *,
    resolution: int | None = None,
    normalization: str | tuple | None = None,
) -> FoldedNetwork:
    """Reads ``variables`` of the flax ``EfficientNet`` ``model`` into a ``FoldedNetwork``
    (float64 folding, stored as float32)."""
    variant = model.variant
    resolution = variant.resolution if resolution is None else resolution
    check_exportable(model, variables, resolution)
    mean, std = resolve_normalization(normalization, variant)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), dict(variables['params']))
    stats = jax.tree.map(
        lambda a: np.asarray(a, np.float64), dict(variables.get('batch_stats', {}))
    )
    act = model.activation or variant.activation

    def conv(p, s, conv_name, bn_name, stride, activation, depthwise=False):
        kernel = p[conv_name]['kernel']
        bn, st = p[bn_name], s[bn_name]
        scale = bn['scale'] / np.sqrt(st['var'] + BN_EPSILON)
        kernel = kernel[:, :, 0, :] * scale if depthwise else kernel * scale
        bias = bn['bias'] - st['mean'] * scale
        return Conv(_f32(kernel), _f32(bias), stride, activation)

    blocks = []
    for spec in arch.build_blocks(variant, model.drop_path_rate):
        p, s = params[f'blocks_{spec.index}'], stats[f'blocks_{spec.index}']
        # Fused-MBConv: the expansion (or, without one, the projection) is the strided k x k.
        expand_stride = spec.stride if spec.fused else 1
        expand = None
        if spec.expand != 1:
            expand = conv(p, s, 'expand_conv', 'expand_bn', expand_stride, act)
        dw = None
        if not spec.fused:
            dw = conv(p, s, 'dw_conv', 'dw_bn', spec.stride, act, depthwise=True)
        se = None
        if spec.se_channels:
            q = p['se']
            se = SqueezeExcite(
                _f32(q['reduce']['kernel'][0, 0]),
                _f32(q['reduce']['bias']),
                _f32(q['expand']['kernel'][0, 0]),
                _f32(q['expand']['bias']),
                act,
            )
        if spec.fused and spec.expand == 1:
            project = conv(p, s, 'project_conv', 'project_bn', spec.stride, act)
        else:
            project = conv(p, s, 'project_conv', 'project_bn', 1, None)
        blocks.append(Block(expand, dw, se, project, spec.has_residual))
    return FoldedNetwork(
        name=variant.name,
        resolution=resolution,
        padding=model.padding,
        mean=mean,
        std=std,
        stem=conv(params, stats, 'stem_conv', 'stem_bn', 2, act),
        blocks=tuple(blocks),
        head=conv(params, stats, 'head_conv', 'head_bn', 1, act),
        classifier_kernel=_f32(params['classifier']['kernel']),
        classifier_bias=_f32(params['classifier']['bias']),
    )


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)
