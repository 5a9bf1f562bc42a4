"""The EfficientNet Flax module: stem, MBConv and Fused-MBConv blocks and head, built from
``arch.BlockSpec``s."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientnet import arch
from efficientnet import dropblock as dropblock_lib
from efficientnet.layers import (
    BatchNorm,
    Conv2D,
    DepthwiseConv2D,
    PointwiseWeights,
    activation_fn,
    dense_kernel_init,
)

Array = jax.Array


def drop_path(x: Array, survival: float | Array, rng: Array) -> Array:
    """Stochastic depth: keeps each example's branch with probability ``survival`` and divides
    the kept ones by it (per-example Bernoulli mask, docs/reference.md §3)."""
    keep = jax.random.bernoulli(rng, survival, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / jnp.asarray(survival, x.dtype), jnp.zeros((), x.dtype))


class SqueezeExcite(nn.Module):
    """Spatial mean -> 1x1 conv (bias) -> activation -> 1x1 conv (bias) -> sigmoid -> scale.

    Computed in float32 whatever the activation dtype (float64 in float64): it is cheap and
    gates every channel.
    """

    reduced: int
    activation: str = 'swish'

    @nn.compact
    def __call__(self, x: Array, fused_bn: tuple | None = None) -> Array:
        """With ``fused_bn`` (BatchNorm's scale, bias, epsilon, activation and group size, as
        ``BatchNorm`` passes them on CPU), ``x`` is BatchNorm's float32 input as [N, pixels, C]
        and the whole of BatchNorm, activation and squeeze-excite runs as
        ``cpu_kernels.batch_norm_act_se``; it returns the output and the batch statistics."""
        if fused_bn is not None:
            from efficientnet import cpu_kernels

            scale, bias, epsilon, activation, group = fused_bn
            c = x.shape[-1]
            w_reduce, b_reduce = PointwiseWeights(self.reduced, name='reduce')(c)
            w_expand, b_expand = PointwiseWeights(c, name='expand')(self.reduced)
            return cpu_kernels.batch_norm_act_se(
                x,
                scale,
                bias,
                w_reduce,
                b_reduce,
                w_expand,
                b_expand,
                epsilon,
                activation,
                self.activation,
                group,
            )
        f = jnp.promote_types(x.dtype, jnp.float32)
        s = jnp.mean(x.astype(f), axis=(1, 2), keepdims=True)
        s = Conv2D(self.reduced, use_bias=True, dtype=f, name='reduce')(s)
        s = activation_fn(self.activation)(s)
        s = Conv2D(x.shape[-1], use_bias=True, dtype=f, name='expand')(s)
        return x * jax.nn.sigmoid(s).astype(x.dtype)


class _Block(nn.Module):
    """What MBConv and Fused-MBConv share: their options, BatchNorm's arguments, and stochastic
    depth with the skip connection.

    ``survival`` and ``rng`` of ``__call__``, when given, replace ``spec.survival`` and the
    block's own 'dropout' key for stochastic depth: a scan over repeated blocks passes each
    block's rate and key (the one the block would draw unscanned) as scanned inputs."""

    spec: arch.BlockSpec
    activation: str = 'swish'
    padding: str = 'same'
    depthwise_impl: str = 'auto'
    bn_group_size: int | None = None
    dtype: Any = jnp.float32
    bn_momentum: float = 0.99

    def _bn(self, train: bool) -> dict[str, Any]:
        return dict(
            use_running_average=not train,
            momentum=self.bn_momentum,
            group_size=self.bn_group_size,
            dtype=self.dtype,
        )

    def _residual(
        self, x: Array, inputs: Array, train: bool, survival: Array | None, rng: Array | None
    ) -> Array:
        """Stochastic depth and the skip connection, when the block keeps its shape."""
        s = self.spec
        if s.has_residual:
            if train and s.survival < 1.0:
                rate = s.survival if survival is None else survival
                x = drop_path(x, rate, self.make_rng('dropout') if rng is None else rng)
            x = x + inputs
        return x


class MBConv(_Block):
    """Inverted bottleneck: [expand 1x1] -> depthwise kxk -> SE -> project 1x1 (+ residual)."""

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool = False,
        survival: Array | None = None,
        rng: Array | None = None,
    ) -> Array:
        s = self.spec
        bn = self._bn(train)
        inputs = x
        if s.expand != 1:
            x = Conv2D(s.expanded_channels, dtype=self.dtype, name='expand_conv')(x)
            x = BatchNorm(**bn, activation=self.activation, name='expand_bn')(x)
        x = DepthwiseConv2D(
            s.kernel, s.stride, self.padding, self.depthwise_impl, dtype=self.dtype, name='dw_conv'
        )(x)
        se = SqueezeExcite(s.se_channels, self.activation, name='se') if s.se_channels else None
        x = BatchNorm(**bn, activation=self.activation, name='dw_bn')(x, squeeze_excite=se)
        x = Conv2D(s.out_channels, dtype=self.dtype, name='project_conv')(x)
        x = BatchNorm(**bn, name='project_bn')(x)
        return self._residual(x, inputs, train, survival, rng)


class FusedMBConv(_Block):
    """EfficientNetV2's Fused-MBConv: k x k conv (stride) to e * Cin -> [SE] -> 1x1 project
    (+ residual). With expand 1 the k x k conv goes straight to Cout and is followed by BN and
    the activation (the project conv of the e > 1 form has none), then the residual.

    The layer names follow ``MBConv`` (``expand_conv``/``expand_bn``, ``project_conv``/
    ``project_bn``): the e = 1 form is one ``project_conv``, as in keras.applications.
    ``depthwise_impl`` is accepted (and unused) so both block types take the same arguments.
    """

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool = False,
        survival: Array | None = None,
        rng: Array | None = None,
    ) -> Array:
        s = self.spec
        bn = self._bn(train)
        conv = dict(padding=self.padding, dtype=self.dtype)
        inputs = x
        if s.expand != 1:
            x = Conv2D(s.expanded_channels, s.kernel, s.stride, **conv, name='expand_conv')(x)
            se = SqueezeExcite(s.se_channels, self.activation, name='se') if s.se_channels else None
            x = BatchNorm(**bn, activation=self.activation, name='expand_bn')(x, squeeze_excite=se)
            x = Conv2D(s.out_channels, **conv, name='project_conv')(x)
            x = BatchNorm(**bn, name='project_bn')(x)
        else:
            if s.se_channels:  # no published V2 uses it; the official code would put it here
                raise ValueError('a Fused-MBConv block without expansion has no squeeze-excite')
            x = Conv2D(s.out_channels, s.kernel, s.stride, **conv, name='project_conv')(x)
            x = BatchNorm(**bn, activation=self.activation, name='project_bn')(x)
        return self._residual(x, inputs, train, survival, rng)


class _BlockRng(nn.Module):
    """Draws the 'dropout' key that a block of the same name draws (flax derives a module's keys
    from its name path), so a scanned block drops the same examples as the unscanned one."""

    @nn.compact
    def __call__(self) -> Array:
        return self.make_rng('dropout')


def _shape_key(spec: arch.BlockSpec) -> arch.BlockSpec:
    """The spec without what differs between the repeats of a stage (position and
    stochastic-depth rate; whether the rate is below 1 stays: it selects code)."""
    return dataclasses.replace(spec, index=0, survival=float(spec.survival < 1.0))


def scan_runs(blocks: list[arch.BlockSpec], ends: Iterable[int] = ()) -> list[list[arch.BlockSpec]]:
    """Splits ``blocks`` into consecutive runs that one compiled block body can compute: the
    blocks of a run differ only in index and stochastic-depth rate and keep the shape of their
    input (stride 1, as many channels out as in), so a stage becomes its first block plus one
    run of its repeats. A run also ends at each index in ``ends`` (the endpoints)."""
    ends = set(ends)
    runs: list[list[arch.BlockSpec]] = []
    for spec in blocks:
        prev = runs[-1][-1] if runs else None
        if (
            prev is not None
            and prev.index not in ends
            and spec.stride == 1
            and spec.in_channels == spec.out_channels
            and _shape_key(spec) == _shape_key(prev)
        ):
            runs[-1].append(spec)
        else:
            runs.append([spec])
    return runs


# The train state's layout (training/state.py): with ``scan_blocks`` the repeats of each stage
# are stored stacked, as the scan computes them, under one name per run of blocks; checkpoints,
# weight files and ``model.init`` keep one subtree per block. The two convert losslessly.
_STACKED = re.compile(r'blocks_(\d+)_to_(\d+)$')


def _indices(run: Sequence[arch.BlockSpec] | Sequence[int]) -> list[int]:
    return [getattr(b, 'index', b) for b in run]


def stacked_name(run: Sequence[arch.BlockSpec] | Sequence[int]) -> str:
    """The name of the stacked variables of ``run`` (block specs or indices):
    'blocks_<first>_to_<last>'."""
    indices = _indices(run)
    return f'blocks_{indices[0]}_to_{indices[-1]}'


def stacked_range(name: Any) -> range | None:
    """The block indices that a stacked name holds, or None for any other name."""
    m = _STACKED.match(str(name))
    return range(int(m.group(1)), int(m.group(2)) + 1) if m else None


def stacked_runs(model: EfficientNet) -> list[list[arch.BlockSpec]]:
    """The runs of blocks that ``model`` computes with one scan, whose variables the train
    state stores stacked: none without ``scan_blocks``; never a stage with DropBlock (it runs
    block by block in training)."""
    if not model.scan_blocks:
        return []
    blocks = model.blocks
    num_stages = max(spec.stage for spec in blocks) + 1
    dropblock = dropblock_lib.resolve_stages(model.dropblock_stages, num_stages)
    runs = scan_runs(blocks, arch.endpoint_blocks(blocks))
    return [run for run in runs if len(run) > 1 and run[0].stage not in dropblock]


def _is_block_dict(names: set[str]):
    return lambda d: isinstance(d, dict) and any(n in d for n in names)


def stack_blocks(tree: Any, runs: Sequence[Sequence[arch.BlockSpec] | Sequence[int]]) -> Any:
    """``tree`` (variables, a train state, optimizer state: any pytree) with the per-block
    subtrees of each run in ``runs`` (``stacked_runs``, or runs of block indices) replaced, in
    every dict that holds them, by one subtree of their leaves stacked on a new leading axis
    (``stacked_name``)."""
    runs = [_indices(run) for run in runs]
    firsts = {f'blocks_{run[0]}' for run in runs}

    def convert(d):
        if not _is_block_dict(firsts)(d):
            return d
        d = dict(d)
        for run in runs:
            names = [f'blocks_{i}' for i in run]
            parts = [d.get(n) for n in names]
            shapes = [jax.tree.map(jnp.shape, p) for p in parts]
            if all(p is not None for p in parts) and all(t == shapes[0] for t in shapes):
                for n in names:
                    del d[n]
                d[stacked_name(run)] = jax.tree.map(lambda *a: jnp.stack(a), *parts)
            # else (another model's variables): left per block, for the caller to report
        return d

    return jax.tree.map(convert, tree, is_leaf=_is_block_dict(firsts))


def _take(leaf: Any, j: int) -> Any:
    """Block ``j`` of a stacked leaf: an array, a ShapeDtypeStruct or a NamedSharding."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = _take(sharding, j)
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    if isinstance(leaf, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec(*leaf.spec[1:]))
    return leaf[j]


def unstack_blocks(tree: Any) -> Any:
    """The inverse of ``stack_blocks``: every stacked subtree (found by its name) split back
    into one subtree per block, in block order. Takes arrays, shapes (ShapeDtypeStruct) and
    shardings (NamedSharding) alike."""

    def has(d):
        return isinstance(d, dict) and any(stacked_range(k) is not None for k in d)

    def convert(d):
        if not has(d):
            return d
        out = {}
        for k, v in d.items():
            indices = stacked_range(k)
            if indices is None:
                out[k] = v
                continue
            for j, i in enumerate(indices):
                out[f'blocks_{i}'] = jax.tree.map(lambda a, j=j: _take(a, j), v)
        return out

    return jax.tree.map(convert, tree, is_leaf=has)


class EfficientNet(nn.Module):
    """EfficientNet / EfficientNet-Lite / EfficientNetV2.

    ``apply(variables, images, train=False)`` takes NHWC float images that are already
    normalised (see ``model_info``) and returns float32 logits, or pooled float32 features when
    ``num_classes == 0``. With ``return_endpoints=True`` it returns a dict holding
    'reduction_1' ... 'reduction_5' (the feature maps at strides 2, 4, 8, 16, 32, as EfficientDet
    consumes them) and 'features' or 'logits'. ``features_only=True`` builds no head and returns
    only the endpoints.

    Training needs the 'dropout' rng (dropout and stochastic depth) and a mutable
    'batch_stats' collection.

    ``remat=True`` rematerialises each MBConv block: the backward pass keeps only the blocks'
    inputs and recomputes everything inside a block from its input, trading a second forward
    pass through the blocks for the activation memory of the large variants. The parameters and
    their names are the same as without it, the gradients equal within float32 rounding.

    ``scan_blocks=True`` computes the repeats of each stage (the blocks after its first, which
    keep their input's shape) with one ``jax.lax.scan`` over their stacked variables, each
    block's stochastic-depth rate and dropout key as scanned inputs: XLA compiles one block
    body per stage instead of every block, so compile time stops growing with depth. It takes
    the variables one subtree per block (``blocks_<i>``, what ``init`` returns, checkpoints and
    weight files hold; stacked inside the call, the gradients flow back to each block's leaves)
    or with each run of repeats already stacked (``stack_blocks``: ``blocks_<i>_to_<j>``, the
    train state's layout, which saves the stacking and the per-block optimizer updates from
    the compiled step). Initialisation is the same either way (each run of repeats is
    initialised by one vmapped block, ``_init_run``), and outputs and gradients equal the
    unscanned model's within float32 rounding.
    """

    variant: arch.Variant
    num_classes: int = 1000
    dropout_rate: float | None = None  # None: the variant's
    drop_path_rate: float = arch.DROP_PATH_RATE
    padding: str = 'same'
    depthwise_impl: str = 'auto'
    bn_group_size: int | None = None
    activation: str | None = None  # None: the variant's
    bn_momentum: float | None = None  # None: the variant's (0.99 V1, 0.9 V2)
    features_only: bool = False  # backbone use: no head, returns the endpoints dict only
    remat: bool = False  # recompute each block's activations in the backward pass
    scan_blocks: bool = False  # compile each stage's repeated blocks once (jax.lax.scan)
    # DropBlock (efficientnet/dropblock.py) on every block output of these stages (0-based,
    # negative from the end), in training calls that pass ``dropblock_keep_prob``: the last
    # stage at that keep probability, each stage before it with a quarter of the drop rate
    # of the next (``dropblock.stage_keep_prob``, the official ResNet rule), unless
    # ``dropblock_scale_by_stage`` is False.
    dropblock_stages: tuple[int, ...] = ()
    dropblock_size: int = 7
    dropblock_scale_by_stage: bool = True  # False: the same keep probability on every stage
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> list[arch.BlockSpec]:
        return arch.build_blocks(self.variant, self.drop_path_rate)

    def _check_input(self, x: Array) -> None:
        if x.ndim != 4:
            raise ValueError(f'expected NHWC images of rank 4, got shape {tuple(x.shape)}')
        if x.shape[-1] != 3:
            raise ValueError(
                f'expected 3 colour channels last (NHWC), got shape {tuple(x.shape)}; '
                'grayscale images must be repeated to 3 channels, NCHW transposed to NHWC'
            )
        if x.shape[1] < 2 or x.shape[2] < 2:
            raise ValueError(f'images of {x.shape[1]}x{x.shape[2]} are too small')

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool = False,
        return_endpoints: bool = False,
        dropblock_keep_prob: Any = None,
    ):
        self._check_input(x)
        activation = self.activation or self.variant.activation
        activation_fn(activation)  # an unknown name fails here, before any layer is built
        momentum = self.variant.bn_momentum if self.bn_momentum is None else self.bn_momentum
        bn = dict(
            use_running_average=not train,
            momentum=momentum,
            group_size=self.bn_group_size,
            dtype=self.dtype,
        )
        endpoints = {}

        x = Conv2D(
            arch.stem_channels(self.variant),
            kernel=3,
            stride=2,
            padding=self.padding,
            dtype=self.dtype,
            name='stem_conv',
        )(x)
        x = BatchNorm(**bn, activation=activation, name='stem_bn')(x)

        blocks = self.blocks
        names = arch.endpoint_blocks(blocks)
        # ``train`` (argument 2, counting self) is static: it chooses Python branches (batch or
        # moving statistics, stochastic depth). Variables, rngs and names are lifted unchanged,
        # so the parameter tree and the dropout draws do not depend on ``remat``.
        kinds = {False: MBConv, True: FusedMBConv}
        blocks_of = kinds
        if self.remat:
            blocks_of = {k: nn.remat(v, static_argnums=(2,)) for k, v in kinds.items()}
        options = (
            activation, self.padding, self.depthwise_impl, self.bn_group_size, self.dtype, momentum
        )  # fmt: skip
        dropblock_stages = frozenset()
        if train and self.dropblock_stages and dropblock_keep_prob is not None:
            num_stages = max(spec.stage for spec in blocks) + 1
            dropblock_stages = dropblock_lib.resolve_stages(self.dropblock_stages, num_stages)
        params = self.variables.get('params', {})
        for run in scan_runs(blocks, names):
            # A stage with DropBlock after each block runs unscanned. Initialisation gives the
            # repeats of a stage the same values scanned or not (``_init_run``).
            scan = self.scan_blocks and len(run) > 1 and run[0].stage not in dropblock_stages
            template = kinds[run[0].fused](run[0], *options, parent=None)
            if len(run) > 1 and self.is_initializing():
                self._init_run(run, x, template)  # the run keeps its input's shape
            elif scan:
                x = self._scan_run(run, x, train, template)
            elif stacked_name(run) in params:
                raise ValueError(
                    f'the variables hold blocks {run[0].index}-{run[-1].index} stacked '
                    f"({stacked_name(run)}, the train state's layout), which only a model with "
                    'scan_blocks=True computes outside DropBlock stages; convert them with '
                    'efficientnet.unstack_blocks(variables)'
                )
            else:
                for spec in run:
                    block = blocks_of[spec.fused]
                    x = block(spec, *options, name=f'blocks_{spec.index}')(x, train)
                    if spec.stage in dropblock_stages:
                        rng = self.make_rng('dropout')
                        keep = dropblock_keep_prob
                        if self.dropblock_scale_by_stage:
                            keep = dropblock_lib.stage_keep_prob(keep, spec.stage, num_stages)
                        x = dropblock_lib.dropblock(x, keep, self.dropblock_size, rng)
            if run[-1].index in names:
                endpoints[names[run[-1].index]] = x
        if self.features_only:
            return endpoints

        x = Conv2D(arch.head_channels(self.variant), dtype=self.dtype, name='head_conv')(x)
        x = BatchNorm(**bn, activation=activation, name='head_bn')(x)
        x = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))
        out_name = 'features'
        if self.num_classes > 0:
            rate = self.variant.dropout if self.dropout_rate is None else self.dropout_rate
            x = nn.Dropout(rate, deterministic=not train)(x)
            x = nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name='classifier')(x)
            out_name = 'logits'
        if return_endpoints:
            endpoints[out_name] = x
            return endpoints
        return x

    def _init_run(self, run: list[arch.BlockSpec], x: Array, template: nn.Module) -> None:
        """Creates the variables of the blocks of ``run`` (see ``scan_runs``), each under its
        own name: ``template`` (an unbound block of the run's shape) initialised once, vmapped
        over one key per block (split from a key of this module). One compiled initialisation per
        run instead of per block, scanned or not, so the values do not depend on
        ``scan_blocks``."""
        keys = jax.random.split(self.make_rng('params'), len(run))
        stacked = jax.vmap(lambda k: template.init({'params': k}, x, False))(keys)
        for j, spec in enumerate(run):
            for col, tree in stacked.items():
                block = jax.tree.map(lambda a, j=j: a[j], tree)
                self.put_variable(col, f'blocks_{spec.index}', block)

    def _scan_run(self, run: list[arch.BlockSpec], x: Array, train: bool, template: nn.Module):
        """``x`` through the blocks of ``run`` (see ``scan_runs``) as one ``jax.lax.scan`` of
        ``template`` (an unbound block of the run's shape) over the blocks' stacked variables,
        stochastic-depth rates and dropout keys. The variables are either stacked already (the
        train state's layout, ``stack_blocks``: one subtree named by ``stacked_name``) or one
        subtree per block, stacked here; the new BatchNorm statistics go back in the same
        layout."""
        names = [f'blocks_{spec.index}' for spec in run]
        stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
        cols = {c: t for c, t in self.variables.items() if c in ('params', 'batch_stats')}
        stacked = stacked_name(run)
        is_stacked = stacked in cols.get('params', {})
        if is_stacked:
            xs = {'variables': {c: t[stacked] for c, t in cols.items()}}
        else:
            xs = {'variables': {c: stack([t[n] for n in names]) for c, t in cols.items()}}
        drop = train and run[0].survival < 1.0  # each block draws its own key, as unscanned
        if drop:
            xs['survival'] = jnp.asarray([spec.survival for spec in run], jnp.float32)
            xs['rng'] = jnp.stack([_BlockRng(name=n)() for n in names])
        mutable = ['batch_stats'] if self.is_mutable_collection('batch_stats') else False

        def body(carry, xs):
            out = template.apply(
                xs['variables'], carry, train, xs.get('survival'), xs.get('rng'), mutable=mutable
            )
            return (out[0], out[1]['batch_stats']) if mutable else (out, None)

        if self.remat:  # as nn.remat per block: keep only each block's input
            body = jax.checkpoint(body, prevent_cse=False)
        x, new_stats = jax.lax.scan(body, x, xs)
        if mutable and is_stacked:
            self.put_variable('batch_stats', stacked, new_stats)
        elif mutable:
            for j, n in enumerate(names):
                self.put_variable('batch_stats', n, jax.tree.map(lambda a, j=j: a[j], new_stats))
        return x


__all__ = [
    'EfficientNet',
    'FusedMBConv',
    'MBConv',
    'SqueezeExcite',
    'drop_path',
    'scan_runs',
    'stack_blocks',
    'stacked_name',
    'stacked_range',
    'stacked_runs',
    'unstack_blocks',
]
