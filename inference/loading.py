"""One entry point for every kind of weights this project reads, ready for inference.

    loaded = load_model('/ckpt/b0')                         # a training workdir (EMA, best step)
    loaded = load_model('gs://bucket/b0')                   # any of these may be on gs://
    loaded = load_model('b3.msgpack')                       # python -m efficientnet.weights output
    loaded = load_model('efficientnet-b0-355c32eb.pth', model='b0')   # efficientnet_pytorch
    loaded = load_model('model.safetensors', model='v2-s')  # timm tf_efficientnetv2_s
    loaded = load_model('efficientnetb3.h5', model='b3')              # keras.applications
    loaded = load_model('efficientnet-b4/', model='b4')               # official TF checkpoint
    logits = loaded.logits(uint8_images)                    # [N, S, S, 3] on [0, 255]

A ``LoadedModel`` carries what evaluation needs besides the weights: the resolution, the eval
crop fraction, the interpolation and the input normalisation the weights were trained with.
For a workdir these come from its ``config.json``; for published weights from the variant
(docs/reference.md §5: ImageNet mean/std and bicubic for B0-B7 and V2-B0..B3, (x - 127) / 128
and bilinear for Lite, (x - 128) / 128 and bilinear without a crop for V2-S/M/L/XL
(docs/models.md); AdvProp checkpoints need ``normalization='advprop'``, which no file records).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import efficientnet
from efficientnet import arch, paths
from efficientnet.weights import train_state
from inference.loaded_model import LoadedModel

FORMATS = ('workdir', 'msgpack', 'keras', 'torch', 'tf')
_KERAS_SUFFIXES = ('.h5', '.keras')
_TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')
_MSGPACK_SUFFIXES = ('.msgpack',)


def detect_format(source: str) -> str:
    """The format of ``source`` (local or gs://) from its suffix and what the path holds;
    ValueError if none."""
    path = os.fspath(source)
    where = paths.as_path(path)
    if where.is_dir():
        if where.joinpath('config.json').is_file() or train_state.is_step_dir(path):
            return 'workdir'
        names = paths.listdir(path)
        if 'checkpoint' in names or any(n.endswith('.index') for n in names):
            return 'tf'
        if any(n in names for n in (train_state.LATEST_DIR, train_state.BEST_DIR)):
            return 'workdir'
        raise ValueError(
            f'{path} is a directory but neither a training workdir (no '
            'config.json) nor a TensorFlow checkpoint directory (no .index file)'
        )
    exists = where.exists()
    if not exists and paths.as_path(path + '.index').exists():
        return 'tf'  # a checkpoint prefix such as efficientnet-b0/model.ckpt
    if not exists:
        raise FileNotFoundError(f'weights not found: {path} (no such file or directory)')
    lower = path.lower()
    if lower.endswith(_MSGPACK_SUFFIXES):
        return 'msgpack'
    if lower.endswith(_KERAS_SUFFIXES):
        return 'keras'
    if lower.endswith(_TORCH_SUFFIXES):
        return 'torch'
    if lower.endswith('.index'):
        return 'tf'
    with where.open('rb') as f:
        head = f.read(64)
    if head.startswith(b'\x89HDF'):
        return 'keras'
    if head.startswith(b'PK'):  # torch.save writes a zip archive
        return 'torch'
    if b'format_version' in head or b'model' in head:
        return 'msgpack'
    raise ValueError(
        f'cannot tell the format of {path}; pass fmt= one of {", ".join(FORMATS)} '
        '(suffixes: .msgpack, .h5/.keras, .pth/.pt, a TF checkpoint prefix)'
    )


def load_model(
    source: str,
    *,
    model: str | None = None,
    fmt: str = 'auto',
    use_ema: bool = True,
    num_classes: int | None = None,
    depthwise_impl: str = 'auto',
    normalization: str | None = None,
) -> LoadedModel:
    """Loads ``source`` (see the module docstring) for float32 inference.

    ``model`` names the variant; it is required for keras/torch/tf weights and, for a workdir
    or msgpack file, must agree with the name stored there. ``use_ema`` picks the EMA weights of
    a workdir or TF checkpoint. ``num_classes`` defaults to the class count of the stored
    classifier (0 when the weights have none: the model then returns pooled features).
    ``normalization`` overrides the input normalisation (e.g. 'advprop' for AdvProp weights).
    """
    source = os.fspath(source)
    if fmt == 'auto':
        fmt = detect_format(source)
    elif fmt not in FORMATS:
        raise ValueError(
            f'unknown weights format {fmt!r}; expected auto or one of {", ".join(FORMATS)}'
        )
    elif not (
        paths.as_path(source).exists()
        or (fmt == 'tf' and paths.as_path(source + '.index').exists())
    ):
        raise FileNotFoundError(f'weights not found: {source} (no such file or directory)')
    if depthwise_impl not in efficientnet.DEPTHWISE_IMPLS:
        raise ValueError(
            f'depthwise_impl must be one of {efficientnet.DEPTHWISE_IMPLS}, got {depthwise_impl!r}'
        )
    if fmt != 'workdir' and fmt != 'msgpack' and not model:
        raise ValueError(
            f'{fmt} weights do not record which variant they are: pass the model '
            f'name (e.g. model="efficientnet-b0") to load {source}'
        )
    if model is not None:
        arch.get_variant(model)  # a clear error for an unknown name, before any reading
    what = f'{fmt} weights {source}' + (f' as {model}' if model else '')
    try:
        if fmt == 'workdir':
            loaded = _load_workdir(source, model, use_ema, num_classes, depthwise_impl)
        else:
            name, variables, classes = _read_weights(source, fmt, model, use_ema, num_classes)
            loaded = _published(name, variables, classes, depthwise_impl, source, fmt)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise _prefixed(e, f'loading {what}: ') from e
    if normalization is not None:
        from efficientnet.normalization import NORMALIZATIONS

        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f'normalization must be one of {sorted(NORMALIZATIONS)}, got {normalization!r}'
            )
        loaded.normalization = normalization
    _check_fits(loaded, what)
    return loaded


# ------------------------------------------------------------------------------------ formats


def _load_workdir(
    source: str, model: str | None, use_ema: bool, num_classes: int | None, depthwise_impl: str
) -> LoadedModel:
    """A train.py workdir or step directory, with the eval facts its config.json records."""
    import ml_collections

    from training import config_resolve

    path = paths.absolute(source)
    step_dir = path if train_state.is_step_dir(path) else None
    workdir = train_state.workdir_of(path) if step_dir else path
    config_path = paths.as_path(workdir, 'config.json')
    if not config_path.is_file():
        raise FileNotFoundError(
            f'{config_path} not found: {source} is not a training workdir '
            '(train.py writes config.json there)'
        )
    saved = json.loads(config_path.read_text())
    config = ml_collections.ConfigDict(saved['config'])
    stored = arch.get_variant(config.model.name).name
    if model is not None and arch.get_variant(model).name != stored:
        raise ValueError(
            f'model={model!r} but the workdir trained {stored} '
            f'(config.json); leave model out or name {stored}'
        )
    classes = int(saved.get('derived', {}).get('num_classes', config.data.num_classes))
    if num_classes is not None and num_classes != classes:
        raise ValueError(f'num_classes={num_classes} but the workdir trained {classes} classes')
    step_dir = step_dir or train_state.find_step_dir(workdir)  # best, else latest
    if step_dir is None:
        raise FileNotFoundError(
            f'{workdir} holds no finished checkpoint (looked in best/ and checkpoints/)'
        )
    variables = train_state.read_variables(step_dir, use_ema=use_ema)
    # Inference build: float32, no BatchNorm groups (train=False uses the moving statistics),
    # no remat (nothing is differentiated).
    with config.unlocked():
        config.model.compute_dtype = 'float32'
        config.model.bn_group_size = None
        config.model.bn_tpu_cores = None
        config.model.remat = False
        config.model.depthwise_impl = depthwise_impl
    module = config_resolve.build_model(config, classes)
    d = config.data
    return LoadedModel(
        name=module.variant.name,
        model=module,
        variables=_numpy(variables),
        num_classes=classes,
        resolution=int(d.resolution),
        crop_fraction=d.get('crop_fraction'),
        normalization=saved.get('derived', {}).get('normalization')
        or d.get('normalization')
        or module.variant.normalization,
        interpolation=d.get('interpolation', 'bicubic'),
        source=source,
        format='workdir',
        data_config=d.to_dict(),
        step=int(os.path.basename(step_dir)),
    )


def _read_weights(
    source: str, fmt: str, model: str | None, use_ema: bool, num_classes: int | None
) -> tuple[str, dict, int]:
    """(variant name, variables, classifier classes) of a msgpack file or published weights;
    ``efficientnet.weights`` reads each format and counts its classifier's classes."""
    from efficientnet import weights

    if fmt == 'msgpack':
        from efficientnet.weights import core

        stored, variables = weights.load_variables(source)
        stored = arch.get_variant(stored).name
        if model is not None and arch.get_variant(model).name != stored:
            raise ValueError(
                f'model={model!r} but the file holds {stored} weights; leave model out or name '
                f'{stored}'
            )
        classes = core.classifier_classes(variables)
        if num_classes is not None and num_classes != classes:
            raise ValueError(f"num_classes={num_classes} but the file's classifier has {classes}")
        batch_stats = variables.get('batch_stats', {})
        return stored, {'params': variables['params'], 'batch_stats': batch_stats}, classes
    name = arch.get_variant(model).name
    if fmt == 'torch':
        from efficientnet.weights import pytorch

        state = pytorch.load_state_dict(source)  # read once: counted, then converted
        classes = pytorch.classifier_classes(state) if num_classes is None else num_classes
        variables = weights.from_torch(
            state, name, num_classes=max(classes, 1), skip_head=classes == 0
        )
    elif fmt == 'keras':
        from efficientnet.weights import keras_app

        keras_model = keras_app.load_keras_file(source, name)
        classes = keras_app.classifier_classes(keras_model)
        if num_classes is not None and num_classes != classes:
            raise ValueError(f'num_classes={num_classes} but the Keras model has {classes}')
        variables = weights.from_keras(
            keras_model, name, num_classes=max(classes, 1), skip_head=classes == 0
        )
    else:
        from efficientnet.weights import tf_checkpoint

        classes = tf_checkpoint.classifier_classes(source) if num_classes is None else num_classes
        variables = weights.from_tf_checkpoint(
            source, name, use_ema=use_ema, num_classes=max(classes, 1), skip_head=classes == 0
        )
    return name, variables, classes


def _published(
    name: str, variables: dict, num_classes: int, depthwise_impl: str, source: str, fmt: str
) -> LoadedModel:
    """Published or converted weights: the variant's own resolution and official eval
    preprocessing (for V2-S/M/L/XL at 320 px and above, no crop: crop fraction 1.0).
    efficientnet_pytorch and timm's tf_ models pad like TF SAME, so every format uses 'same'."""
    variant = arch.get_variant(name)
    default_crop = variant.resolution / (variant.resolution + arch.CROP_PADDING)
    module = efficientnet.create_model(name, num_classes=num_classes, depthwise_impl=depthwise_impl)
    return LoadedModel(
        name=variant.name,
        model=module,
        variables=_numpy(variables),
        num_classes=num_classes,
        resolution=variant.resolution,
        crop_fraction=None if variant.crop_fraction == default_crop else variant.crop_fraction,
        normalization=variant.normalization,
        interpolation=variant.interpolation,
        source=source,
        format=fmt,
    )


# ------------------------------------------------------------------------------------ helpers


def _numpy(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def _check_fits(loaded: LoadedModel, what: str) -> None:
    """Every tensor of the module present with its shape, nothing extra (one clear error)."""
    from efficientnet.weights import WeightsMismatchError

    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    expected = jax.eval_shape(loaded.model.init, jax.random.key(0), x)
    want = {
        jax.tree_util.keystr(p): tuple(v.shape)
        for p, v in jax.tree_util.tree_flatten_with_path(dict(expected))[0]
    }
    have = {
        jax.tree_util.keystr(p): tuple(np.shape(v))
        for p, v in jax.tree_util.tree_flatten_with_path(loaded.variables)[0]
    }
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        parts = [
            f'{len(v)} {k}: {", ".join(v[:3])}'
            for k, v in (
                ('missing', missing),
                ('unexpected', extra),
                ('misshapen', [f'{k} {have[k]} != {want[k]}' for k in wrong]),
            )
            if v
        ]
        raise WeightsMismatchError(
            f'loading {what}: the weights do not fit {loaded.name}: ' + '; '.join(parts)
        )


def _prefixed(error: ValueError, prefix: str) -> ValueError:
    """The same error type with ``prefix`` before its message (falls back to ValueError)."""
    try:
        return type(error)(prefix + str(error))
    except TypeError:
        return ValueError(prefix + str(error))
