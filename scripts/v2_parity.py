"""Every EfficientNetV2 (B0-B3, S, M, L, XL) against keras.applications EfficientNetV2* (no XL
there) and timm's tf_efficientnetv2_*, all three in float64; prints the table of docs/models.md.

    python scripts/v2_parity.py [--variants b0 s xl] [--resolution 65] [--batch 2]

Each oracle gets random weights (its own initialisers for the kernels; BatchNorm gamma, beta,
mean and variance and every bias drawn here) that are exactly representable in float32, so the
weight readers (``from_keras``, ``from_torch``), which hand over float32, lose nothing; the
variables are then widened to float64 for our model (``create_model(..., dtype=float64)`` under
``jax.enable_x64``). The statistics are freely random (not measured on the batch): gamma in
[0.5, 1.5], beta and mean ~ N(0, 0.2), variance in [0.5, 2]. They do not normalise, so the
residual stages of M and L grow the activations (V2-M: to ~1.7e6, logits ~4e5) and even float64
is then ill-conditioned: timm's V2-M against itself in channels-last memory differs by 1.2e-5,
so M and L agree to 1e-7..1e-5, B0-B3, S and XL to 1e-15..1e-10 (docs/models.md). A narrower
gamma in [0.25, 0.75] keeps every activation O(1) and every difference ~1e-15, but then the
input hardly reaches the logits (V2-B0 with the input shifted by one pixel: 3.8e-8), so a
padding error would not show; the wider draw keeps the test sensitive (that shift: 2.7e-2).
The odd default size (65, 33, 17, 9, 5, 3 px down the strides) makes TF SAME pad its extra
pixel on the bottom/right at every stride.

Per variant: ours against timm (timm's random weights through ``from_torch``), ours against
Keras (Keras's random weights through ``from_keras``), and the two oracles against each other
(Keras's weights loaded into timm through the inverse of ``from_torch``'s mapping). Each number
is max |a - b| / max |b| over the logits of the batch. tests/test_v2_parity.py runs the same
``compare``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ('b0', 'b1', 'b2', 'b3', 's', 'm', 'l', 'xl')
KERAS_VARIANTS = ('b0', 'b1', 'b2', 'b3', 's', 'm', 'l')  # keras.applications has no XL
RESOLUTION = 65
BATCH = 2
GAMMA = (0.5, 1.5)  # BatchNorm scale (see the docstring for narrower draws)


def relative_difference(ours: Any, reference: Any) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def float32_exact(a: Any) -> np.ndarray:
    """``a`` rounded to float32 and held as float64."""
    return np.asarray(a, np.float32).astype(np.float64)


def random_bn(rng: np.random.Generator, c: int) -> list[np.ndarray]:
    """gamma, beta, mean, variance (the Keras weight order)."""
    return [
        float32_exact(rng.uniform(*GAMMA, c)),
        float32_exact(rng.normal(0.0, 0.2, c)),
        float32_exact(rng.normal(0.0, 0.2, c)),
        float32_exact(rng.uniform(0.5, 2.0, c)),
    ]


def random_images(res: int, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 255.0, (batch, res, res, 3))


# ------------------------------------------------------------------------------------- ours


@functools.lru_cache
def _jitted(name: str):
    import jax
    import jax.numpy as jnp

    from efficientnet import create_model

    model = create_model(name, dtype=jnp.float64, depthwise_impl='xla')
    return jax.jit(model.apply)


def our_logits(name: str, variables: Any, x: np.ndarray) -> np.ndarray:
    """Our float64 logits of normalised NHWC ``x`` with ``variables`` widened to float64."""
    import jax

    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        out = _jitted(name)(v64, np.asarray(x, np.float64))
        assert out.dtype == np.float64, out.dtype
        return np.asarray(out)


def normalised(name: str, images: np.ndarray) -> np.ndarray:
    """The variant's input contract, in float64."""
    from efficientnet import arch
    from efficientnet.normalization import NORMALIZATIONS

    mean, std = NORMALIZATIONS[arch.get_variant(name).normalization]
    return (images - np.asarray(mean)) / np.asarray(std)


# ------------------------------------------------------------------------------------ keras


@contextlib.contextmanager
def keras_float64() -> Iterator[None]:
    import keras

    # floatx alone is not enough once a global dtype policy exists (as it does after other
    # Keras models in the same process): both are set, and restored.
    old, old_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx('float64')
    keras.config.set_dtype_policy('float64')
    try:
        yield
    finally:
        keras.config.set_floatx(old)
        keras.config.set_dtype_policy(old_policy)


def keras_oracle(suffix: str, res: int, seed: int):
    """keras.applications.EfficientNetV2<suffix> built in float64 at ``res`` px with random,
    float32-exact weights, without its preprocessing layers: it takes the normalised input, as
    ours does. (Keras keeps their constants in float32 whatever floatx says: Rescaling's 1/255
    and Normalization's ImageNet mean come out ~1e-7 relative off in float64. The float32 tests
    check those layers against our input contract.)"""
    import keras

    with keras_float64():
        keras.utils.set_random_seed(seed)
        cls = getattr(keras.applications, 'EfficientNetV2' + suffix.upper())
        model = cls(
            weights=None,
            input_shape=(res, res, 3),
            classifier_activation=None,
            include_preprocessing=False,
        )
    # Every layer computes in float64 and holds float64 variables.
    assert {layer.compute_dtype for layer in model.layers} == {'float64'}
    assert {keras.backend.standardize_dtype(w.dtype) for w in model.weights} == {'float64'}
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights(random_bn(rng, layer.gamma.shape[0]))
        elif layer.weights:  # Conv2D, DepthwiseConv2D (not a Conv2D in Keras 3), Dense
            weights = [float32_exact(w) for w in layer.get_weights()]
            if getattr(layer, 'use_bias', False):
                weights[-1] = float32_exact(rng.normal(0.0, 0.1, weights[-1].shape))
            layer.set_weights(weights)
    return model


def keras_logits(model, x: np.ndarray) -> np.ndarray:
    out = model(np.asarray(x, np.float64), training=False)
    import keras

    assert keras.backend.standardize_dtype(out.dtype) == 'float64', out.dtype
    return np.asarray(out)


# ------------------------------------------------------------------------------------- timm


def timm_oracle(suffix: str, seed: int):
    """timm's tf_efficientnetv2_<suffix> in float64 (``net.double()``) with random,
    float32-exact weights."""
    import torch

    from scripts.timm_import import import_timm

    timm = import_timm()
    torch.manual_seed(seed)
    net = timm.create_model(f'tf_efficientnetv2_{suffix}', pretrained=False).eval().double()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, v in zip(
                    (m.weight, m.bias, m.running_mean, m.running_var),
                    random_bn(rng, m.num_features),
                    strict=True,
                ):
                    t.copy_(torch.from_numpy(v))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.from_numpy(float32_exact(m.weight.numpy())))
                if m.bias is not None:
                    bias = float32_exact(rng.normal(0.0, 0.1, m.bias.shape))
                    m.bias.copy_(torch.from_numpy(bias))
    return net


def timm_logits(net, x_nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2).copy())
        out = net(x)
    assert out.dtype == torch.float64, out.dtype
    return out.numpy()


def timm_state(variables: Any, name: str) -> dict:
    """Our variables as a timm state dict: the inverse of ``from_torch``'s mapping."""
    import torch

    from efficientnet.weights import core, pytorch

    flat = {}
    for collection in ('params', 'batch_stats'):
        stack = [('', variables[collection])]
        while stack:
            prefix, node = stack.pop()
            for k, v in node.items():
                if isinstance(v, dict):
                    stack.append((f'{prefix}{k}/', v))
                else:
                    flat[f'{prefix}{k}'] = np.asarray(v, np.float64)
    shapes = core.target_shapes(name)
    state = {}
    for path, (key, transform) in pytorch.torch_plan(shapes, core.blocks_of(name)).items():
        a = flat[path]
        if transform is core.hwio_from_oihw:
            a = a.transpose(3, 2, 0, 1)
        elif transform is core.transpose_2d:
            a = a.T
        state[key] = torch.from_numpy(np.ascontiguousarray(a))
    return state


def load_timm_state(net, state: dict) -> None:
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith('num_batches_tracked')]
    if missing or result.unexpected_keys:
        raise ValueError(f'missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}')


# ---------------------------------------------------------------------------------- compare


def compare(
    suffix: str,
    res: int = RESOLUTION,
    batch: int = BATCH,
    seed: int = 0,
    controls: bool = False,
) -> dict[str, float]:
    """{'timm': ours vs timm, 'keras': ours vs Keras, 'keras_vs_timm': the oracles against
    each other (the Keras entries only where keras.applications has the variant)}; with
    ``controls``, also ours vs Keras with one BatchNorm's gamma and beta swapped
    ('control_swapped_bn') and with the input shifted by one pixel ('control_shifted')."""
    from efficientnet.weights import from_keras, from_torch

    name = f'efficientnetv2-{suffix}'
    x = normalised(name, random_images(res, batch, seed))
    out = {}
    net = timm_oracle(suffix, seed + 1)
    out['timm'] = relative_difference(
        our_logits(name, from_torch(net.state_dict(), name), x), timm_logits(net, x)
    )
    if suffix in KERAS_VARIANTS:
        model = keras_oracle(suffix, res, seed + 2)
        reference = keras_logits(model, x)
        variables = from_keras(model, name)
        out['keras'] = relative_difference(our_logits(name, variables, x), reference)
        load_timm_state(net, timm_state(variables, name))
        out['keras_vs_timm'] = relative_difference(timm_logits(net, x), reference)
        if controls:
            bn = variables['params']['blocks_3']['project_bn']
            swapped = {**bn, 'scale': bn['bias'], 'bias': bn['scale']}
            params = {**variables['params'], 'blocks_3': {**variables['params']['blocks_3']}}
            params['blocks_3']['project_bn'] = swapped
            wrong = {**variables, 'params': params}
            out['control_swapped_bn'] = relative_difference(our_logits(name, wrong, x), reference)
            shifted = np.roll(x, 1, axis=2)
            out['control_shifted'] = relative_difference(
                our_logits(name, variables, shifted), reference
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--resolution', type=int, default=RESOLUTION)
    parser.add_argument('--batch', type=int, default=BATCH)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    print(f'float64, {args.resolution} px, batch {args.batch}: max |a - b| / max |b| of logits')
    print('| variant | ours vs keras | ours vs timm | keras vs timm | wall s | CPU s |')
    print('|---|---|---|---|---|---|')
    for suffix in args.variants:
        start, cpu = time.perf_counter(), time.process_time()
        d = compare(suffix, args.resolution, args.batch, args.seed)
        cells = [f'{d[k]:.1e}' if k in d else '–' for k in ('keras', 'timm', 'keras_vs_timm')]
        cells += [f'{time.perf_counter() - start:.0f}', f'{time.process_time() - cpu:.0f}']
        print(f'| V2-{suffix.upper()} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    main()
