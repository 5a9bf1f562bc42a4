"""The checks ``training.config_resolve.resolve`` runs before anything is compiled or
written: each problem is one line, and every problem is collected (``problems``), so that a
config with three mistakes reports three lines at once. Types and ranges of every numeric
field, the choices of every named option, batch divisibility over devices, processes,
gradient accumulation, BatchNorm and MixUp groups, the paths a run will use (a ``gs://``
workdir, ``init_from`` or data directory without credentials or without its bucket), the
dataset's availability, progressive learning's stages, the techniques' own sections, and
whether ``init_from`` exists and fits the model (shapes read from its metadata; no array is
restored)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from efficientnet import arch, dropblock, paths
from efficientnet.cli import UserError
from efficientnet.layers import DEPTHWISE_IMPLS
from efficientnet.normalization import NORMALIZATIONS
from training import distill, loss_scale, noisy_student, progressive, pruning
from training.config_model import COMPUTE_DTYPES, bn_group_size, build_model, positive_int


class ConfigError(UserError, ValueError):
    """A config that cannot run; raised before any compilation, with one line per problem."""


def _load_dataset_info(data_config: Any) -> dict[str, int]:
    try:
        import input_pipeline  # lazy: pulls in TensorFlow
    except ImportError as e:
        raise ConfigError(
            f'config.data.name={data_config.name!r} needs the input_pipeline '
            f'package, which failed to import: {e}'
        ) from e
    return input_pipeline.dataset_info(data_config)


def _check(errors: list[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _get(config: Any, path: str) -> Any:
    node = config
    for part in path.split('.'):
        node = node.get(part) if hasattr(node, 'get') else None
    return node


# Every numeric field with the values a run accepts: (path, kind, low, high, optional).
# kind 'int' or 'number'; a bound in '[' ... ']' notation: '[0' includes 0, '(0' excludes it.
_NUMERIC_FIELDS = (
    ('seed', 'int', None, None, False),
    ('log_every_steps', 'int', '(0', None, False),
    ('eval_every_epochs', 'number', None, None, True),  # None or <= 0: only at the end
    ('label_smoothing', 'number', '[0', '1)', False),
    ('ema_decay', 'number', '[0', '1)', False),
    ('prefetch_batches', 'int', '[0', None, False),
    ('data.resolution', 'int', '(0', None, False),
    ('data.crop_fraction', 'number', '(0', '1]', True),
    ('data.holdout_fraction', 'number', '[0', '1)', False),
    ('data.random_translate', 'int', '[0', None, True),  # read with .get: may be absent
    ('data.randaugment_layers', 'int', '[0', None, False),
    ('data.randaugment_magnitude', 'number', '[0', None, False),
    ('data.mixup_alpha', 'number', '[0', None, False),
    ('data.cutmix_alpha', 'number', '[0', None, False),
    ('data.mix_group_size', 'int', '(0', None, False),
    ('data.fake_num_train', 'int', '(0', None, False),
    ('data.fake_num_eval', 'int', '(0', None, False),
    ('model.width', 'number', '(0', None, True),
    ('model.depth', 'number', '(0', None, True),
    ('model.dropout_rate', 'number', '[0', '1)', True),
    ('model.drop_path_rate', 'number', '[0', '1)', False),
    ('optim.base_learning_rate', 'number', '[0', None, False),
    ('optim.warmup_epochs', 'number', '[0', None, False),
    ('optim.decay_epochs', 'number', '(0', None, False),
    ('optim.decay_factor', 'number', '(0', '1]', False),
    ('optim.min_learning_rate', 'number', '[0', None, False),
    ('optim.momentum', 'number', '[0', '1)', False),
    ('optim.rmsprop_decay', 'number', '[0', '1)', False),
    ('optim.rmsprop_epsilon', 'number', '(0', None, False),
    ('optim.weight_decay', 'number', '[0', None, False),
    ('optim.grad_clip_norm', 'number', '[0', None, False),
    ('mesh.fsdp_min_size', 'int', '[0', None, False),
    ('checkpoint.keep', 'int', '(0', None, False),
    ('profile.start_step', 'int', None, None, False),
    ('profile.num_steps', 'int', '(0', None, False),
)


def _in_range(x: float, low: str | None, high: str | None) -> bool:
    if low is not None and (x < float(low[1:]) or (low[0] == '(' and x == float(low[1:]))):
        return False
    if high is not None and (x > float(high[:-1]) or (high[-1] == ')' and x == float(high[:-1]))):
        return False
    return True


def _describe(kind: str, low: str | None, high: str | None, optional: bool) -> str:
    what = 'an integer' if kind == 'int' else 'a number'
    if low == '(0' and high is None:
        what = 'a positive integer' if kind == 'int' else 'a positive number'
    elif low == '[0' and high is None:
        what += ' >= 0'
    elif low is not None and high is not None:
        what += f' in {low}, {high}'
    return what + (' or None' if optional else '')


def _check_fields(errors: list[str], config: Any) -> None:
    """Types and ranges of the numeric fields (a value of the wrong type is reported, never
    compared: a config file may set anything)."""
    for path, kind, low, high, optional in _NUMERIC_FIELDS:
        x = _get(config, path)
        if x is None and optional:
            continue
        ok = (isinstance(x, int) and not isinstance(x, bool)) if kind == 'int' else _is_number(x)
        if not (ok and _in_range(x, low, high)):
            errors.append(
                f'config.{path} must be {_describe(kind, low, high, optional)}, got {x!r}'
            )
    for path, choices in (
        ('data.augment', ('none', 'randaugment', 'autoaugment')),
        ('data.interpolation', ('bicubic', 'bilinear')),
    ):
        x = _get(config, path)
        _check(errors, x in choices, f'config.{path} must be one of {choices}, got {x!r}')


def _check_paths(errors: list[str], config: Any, workdir: str | None) -> None:
    """Every path the run reads or writes: gs:// ones need credentials and an existing bucket
    (one request per bucket; local paths are not checked here)."""
    d = config.data
    errors += paths.problems(
        [
            ('--workdir', workdir),
            ('config.init_from', config.init_from),
            ('config.data.data_dir', d.data_dir),
            ('config.data.manual_dir', d.manual_dir),
            ('config.data.folder', d.folder),
            ('config.data.fashion_mnist_dir', d.get('fashion_mnist_dir')),
            ('config.distill.teacher', config.get('distill', {}).get('teacher')),
            ('config.data.pseudo_labels', d.get('pseudo_labels')),
        ]
    )


def _check_bn_group(errors: list[str], config: Any, micro: int) -> None:
    """The BatchNorm group, chosen or derived, must split the batch of every step."""
    m = config.model
    try:
        g = bn_group_size(config)
    except ValueError as e:
        errors.append(
            f'config.model.bn_tpu_cores={m.bn_tpu_cores!r}: {e}; choose a slice that splits '
            'config.batch_size evenly, or set config.model.bn_group_size'
        )
        return
    if m.bn_group_size is not None or g is None:
        _check(
            errors,
            g is None or (positive_int(g) and micro % g == 0),
            f'config.model.bn_group_size={g} must be a positive divisor of the batch per step '
            f'({micro})',
        )
    else:
        _check(
            errors,
            micro % g == 0,
            f'the BatchNorm group of {g} examples (config.model.bn_tpu_cores={m.bn_tpu_cores} '
            f'at config.batch_size={config.batch_size}) does not divide the batch per step '
            f'({micro}); set config.model.bn_group_size to a divisor of it',
        )


_LOOKUP_FIELDS = (
    'name',
    'data_dir',
    'manual_dir',
    'folder',
    'fashion_mnist_dir',
    'fake_num_',
    'holdout_fraction',
)


def _mentions(errors: list[str], *prefixes: str) -> bool:
    return any(p in e for e in errors for p in prefixes)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _check_init_from(
    errors: list[str], config: Any, workdir: str | None, num_classes: int | None
) -> None:
    """``config.init_from`` exists and, with ``num_classes`` (None: the model config is wrong,
    so only existence is checked), fits the model: every tensor but the classifier must be
    there with the model's shape. Shapes come from the checkpoint's metadata (or the weights
    file), the model's from ``jax.eval_shape``: nothing is restored or compiled. Not checked
    when the workdir holds a checkpoint, which a run resumes from instead."""
    path = config.init_from
    if not path or _mentions(errors, 'config.init_from'):  # a gs:// path already refused
        return
    from efficientnet.weights import train_state
    from training import checkpoint  # lazy: orbax
    from training import state as state_lib

    if workdir and train_state.newest_step_dir(paths.as_path(workdir, train_state.LATEST_DIR)):
        return
    try:
        pretrained = checkpoint.pretrained_shapes(path)
    except Exception as e:  # noqa: BLE001 - unreadable, missing, not weights: all the user's
        errors.append(f'config.init_from={path!r}: {_one_line(e)}')
        return
    if num_classes is None:
        return
    model = build_model(config, num_classes)
    variables = state_lib.per_block(state_lib.abstract_variables(model, config.data.resolution))
    foreign = checkpoint.untransferable(variables, pretrained)
    if foreign:
        m = config.model
        errors.append(
            f'config.init_from={path!r} does not fit config.model ({m.name}, width={m.width}, '
            f'depth={m.depth}): {len(foreign)} tensors are missing or of another shape, e.g. '
            f'{", ".join(foreign[:3])}; only the classifier may differ'
        )


def problems(
    config: Any,
    *,
    device_count: int,
    process_count: int = 1,
    dataset_info_fn: Callable[[Any], dict] | None = None,
    workdir: str | None = None,
) -> tuple[list[str], dict[str, int] | None]:
    """Every problem of ``config`` (and of the ``workdir`` it will run in, when given), one
    line each, and the dataset's sizes (None when they could not be looked up)."""
    errors: list[str] = []
    c, o, m = config, config.optim, config.model
    try:
        arch.get_variant(c.model.name)
    except ValueError as e:
        errors.append(f'config.model.name: {e}')
    _check(
        errors,
        c.model.compute_dtype in COMPUTE_DTYPES,
        f'config.model.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, '
        f'got {c.model.compute_dtype!r}',
    )
    _check(
        errors,
        m.depthwise_impl in DEPTHWISE_IMPLS,
        f'config.model.depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {m.depthwise_impl!r}',
    )
    _check(
        errors,
        c.data.normalization is None or c.data.normalization in NORMALIZATIONS,
        f'config.data.normalization must be one of {sorted(NORMALIZATIONS)}, '
        f'got {c.data.normalization!r}',
    )
    _check(
        errors,
        positive_int(c.batch_size),
        f'config.batch_size must be a positive integer, got {c.batch_size!r}',
    )
    accum = o.grad_accum_steps
    _check(
        errors,
        positive_int(accum),
        f'config.optim.grad_accum_steps must be a positive integer, got {accum!r}',
    )
    eval_batch = c.eval_batch_size if c.eval_batch_size is not None else c.batch_size
    _check(
        errors,
        positive_int(eval_batch),
        f'config.eval_batch_size must be a positive integer, got {eval_batch!r}',
    )
    _check(
        errors,
        positive_int(c.mesh.fsdp) and device_count % c.mesh.fsdp == 0,
        f'config.mesh.fsdp={c.mesh.fsdp} must divide the {device_count} devices',
    )
    _check(
        errors,
        o.name in ('rmsprop', 'momentum', 'adamw'),
        f'config.optim.name must be rmsprop, momentum or adamw, got {o.name!r}',
    )
    _check(
        errors,
        o.schedule in ('exponential', 'cosine', 'constant'),
        f'config.optim.schedule must be exponential, cosine or constant, got {o.schedule!r}',
    )
    _check(
        errors,
        o.weight_decay_mode in ('l2', 'decoupled'),
        f'config.optim.weight_decay_mode must be l2 or decoupled, got {o.weight_decay_mode!r}',
    )
    _check_fields(errors, c)
    shift, side = c.data.get('random_translate'), c.data.resolution
    _check(
        errors,
        not (positive_int(shift) and positive_int(side)) or shift < side,
        f'config.data.random_translate={shift} must be below config.data.resolution={side} '
        '(a shift of a whole side leaves a blank image)',
    )
    _check(
        errors,
        c.total_steps is not None or (_is_number(c.num_epochs) and c.num_epochs > 0),
        f'config.num_epochs must be a positive number, got {c.num_epochs!r}',
    )
    _check(
        errors,
        c.total_steps is None or positive_int(c.total_steps),
        f'config.total_steps must be a positive integer or None, got {c.total_steps!r}',
    )
    _check(
        errors,
        positive_int(c.checkpoint.every_steps),
        f'config.checkpoint.every_steps must be positive, got {c.checkpoint.every_steps!r}',
    )

    micro = 0
    if positive_int(c.batch_size) and positive_int(accum):
        if c.batch_size % accum:
            errors.append(
                f'config.batch_size={c.batch_size} is not divisible by '
                f'config.optim.grad_accum_steps={accum}'
            )
        else:
            micro = c.batch_size // accum
            _check(
                errors,
                micro % device_count == 0,
                f'the batch per step ({micro} = config.batch_size {c.batch_size} / '
                f'grad_accum_steps {accum}) is not divisible by the {device_count} devices',
            )
            _check(
                errors,
                micro % process_count == 0,
                f'the batch per step ({micro}) is not divisible by the {process_count} processes',
            )
            group, local = c.data.get('mix_group_size', 2), micro // process_count
            _check(
                errors,
                not progressive.mixes(c) or not positive_int(group) or local % group == 0,
                f'config.data.mix_group_size={group} does not divide the batch per process '
                f'({local}); MixUp/CutMix pair rows within such groups: set it to a divisor',
            )
            _check_bn_group(errors, c, micro)
    if positive_int(eval_batch):
        _check(
            errors,
            eval_batch % device_count == 0,
            f'config.eval_batch_size={eval_batch} is not divisible by the {device_count} devices',
        )

    _check_paths(errors, c, workdir)
    # Techniques beyond the base recipe (off by default): each module checks its own section.
    for module in (loss_scale, distill, pruning, noisy_student):
        errors += module.config_problems(c)
    db = c.get('dropblock')
    if db is not None:
        _check(
            errors,
            0.0 < db.keep_prob <= 1.0,
            f'config.dropblock.keep_prob must be in (0, 1] (1: off), got {db.keep_prob}',
        )
        _check(
            errors,
            positive_int(db.block_size),
            f'config.dropblock.block_size must be a positive integer, got {db.block_size!r}',
        )
        if db.keep_prob < 1.0 and not errors:
            try:
                num_stages = max(s.stage for s in arch.build_blocks(arch.get_variant(m.name))) + 1
                dropblock.resolve_stages(tuple(db.stages), num_stages)
            except ValueError as e:
                errors.append(f'config.dropblock.stages: {e}')

    info = None
    # The dataset lookup may be slow (TensorFlow, tfds); skipped only when the fields it reads
    # are wrong, where it would just repeat that problem.
    if not _mentions(errors, *(f'config.data.{k}' for k in _LOOKUP_FIELDS)):
        try:
            info = (dataset_info_fn or _load_dataset_info)(c.data)
        except ConfigError as e:
            errors.append(str(e))
        except Exception as e:  # noqa: BLE001 - any failure to find the data is a config error
            where = c.data.data_dir or c.data.folder or 'the default data dir'
            errors.append(
                f'dataset {c.data.name!r} is not available (looked in {where}): '
                f'{type(e).__name__}: {_one_line(e)}'
            )
        if c.data.num_classes is None and c.data.name == 'fake':
            errors.append("config.data.num_classes must be set for the 'fake' dataset")
        elif (
            info is not None
            and c.data.num_classes is not None
            and info['num_classes'] != c.data.num_classes
        ):
            errors.append(
                f'config.data.num_classes={c.data.num_classes} but dataset '
                f'{c.data.name!r} has {info["num_classes"]} classes'
            )
        if info is not None and positive_int(c.batch_size) and info['num_train'] < c.batch_size:
            errors.append(
                f'dataset {c.data.name!r} has {info["num_train"]} training examples, '
                f'fewer than one batch of {c.batch_size}'
            )
    steps_per_epoch = (
        max(1, info['num_train'] // c.batch_size) if info and positive_int(c.batch_size) else None
    )
    errors += progressive.config_problems(c, steps_per_epoch)
    model_ok = not _mentions(errors, 'config.model.', 'config.data.resolution')
    num_classes = (info['num_classes'] if info else c.data.num_classes) or 1
    _check_init_from(errors, c, workdir, num_classes if model_ok else None)
    return errors, info
