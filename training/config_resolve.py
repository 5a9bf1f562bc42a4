"""Derived run values, computed once from the config and checked before anything compiles.

Config files hold choices (global batch, epochs, base learning rate per 256 examples); the
learning rate, steps per epoch, warmup/decay/total steps follow here, so that command-line
overrides stay consistent. ``resolve`` collects every problem into one ConfigError, one line
each, before anything is compiled or written: types and ranges of every field, batch
divisibility, the paths a run will use (a ``gs://`` workdir, ``init_from`` or data directory
without credentials or without its bucket), the dataset's availability, and whether
``init_from`` exists and fits the model (shapes read from its metadata; no array is restored).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

import efficientnet
from efficientnet import arch, dropblock, paths
from efficientnet.cli import UserError, format_problems
from efficientnet.layers import DEPTHWISE_IMPLS
from efficientnet.normalization import NORMALIZATIONS
from training import distill, loss_scale, pruning

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


class ConfigError(UserError, ValueError):
    """A config that cannot run; raised before any compilation, with one line per problem."""


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything derived from the config. Step counts are optimizer updates unless named
    ``micro``; with gradient accumulation k, one update is k train-step calls."""

    num_classes: int
    num_train: int
    num_eval: int
    device_count: int
    process_count: int
    global_batch: int  # examples per optimizer update
    grad_accum_steps: int
    micro_batch: int  # examples per train-step call (global)
    local_micro_batch: int  # per process
    eval_batch: int
    bn_group_size: int | None  # examples per BatchNorm statistics group; None: the whole batch
    normalization: str  # config.data.normalization, else the variant's own
    learning_rate: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    decay_steps: int
    total_micro_steps: int
    eval_every_micro_steps: int
    checkpoint_every_micro_steps: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


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
        ]
    )


def official_bn_group_size(batch_size: int, tpu_cores: int) -> int:
    """Examples per BatchNorm statistics group in the official TPU implementation, for a
    global batch of ``batch_size`` split evenly over ``tpu_cores`` cores.

    That code normalises each core's examples alone on slices of 8 cores or fewer; on larger
    slices it averages the statistics over groups of ``max(8, cores // 8)`` consecutive cores.
    Raises ValueError for a topology the official code rejects.
    """
    if not (_positive_int(batch_size) and _positive_int(tpu_cores)):
        raise ValueError(f'need positive ints, got batch {batch_size!r}, cores {tpu_cores!r}')
    if batch_size % tpu_cores:
        raise ValueError(f'batch {batch_size} does not split evenly over {tpu_cores} TPU cores')
    cores_per_group = 1 if tpu_cores <= 8 else max(8, tpu_cores // 8)
    if tpu_cores % cores_per_group:
        raise ValueError(f'{tpu_cores} TPU cores do not split into groups of {cores_per_group}')
    return cores_per_group * (batch_size // tpu_cores)


def bn_group_size(config: Any) -> int | None:
    """Examples per BatchNorm statistics group: ``config.model.bn_group_size`` when set, else
    the official TPU groups for ``config.model.bn_tpu_cores`` at ``config.batch_size``, else
    None (the whole batch). The one place the group is derived; ``resolve`` checks it."""
    m = config.model
    if m.bn_group_size is not None:
        return m.bn_group_size
    cores = m.get('bn_tpu_cores')  # absent in the config.json of older runs
    return None if cores is None else official_bn_group_size(config.batch_size, cores)


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
            g is None or (_positive_int(g) and micro % g == 0),
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
    variables = state_lib.abstract_variables(model, config.data.resolution)
    foreign = checkpoint.untransferable(variables, pretrained)
    if foreign:
        m = config.model
        errors.append(
            f'config.init_from={path!r} does not fit config.model ({m.name}, width={m.width}, '
            f'depth={m.depth}): {len(foreign)} tensors are missing or of another shape, e.g. '
            f'{", ".join(foreign[:3])}; only the classifier may differ'
        )


def resolve(
    config: Any,
    *,
    device_count: int,
    process_count: int = 1,
    dataset_info_fn: Callable[[Any], dict] | None = None,
    workdir: str | None = None,
) -> RunPlan:
    """Validates ``config`` (and the ``workdir`` it will run in, when given) and derives the
    run plan; raises ConfigError listing every problem."""
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
        _positive_int(c.batch_size),
        f'config.batch_size must be a positive integer, got {c.batch_size!r}',
    )
    accum = o.grad_accum_steps
    _check(
        errors,
        _positive_int(accum),
        f'config.optim.grad_accum_steps must be a positive integer, got {accum!r}',
    )
    eval_batch = c.eval_batch_size if c.eval_batch_size is not None else c.batch_size
    _check(
        errors,
        _positive_int(eval_batch),
        f'config.eval_batch_size must be a positive integer, got {eval_batch!r}',
    )
    _check(
        errors,
        _positive_int(c.mesh.fsdp) and device_count % c.mesh.fsdp == 0,
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
    _check(
        errors,
        c.total_steps is not None or (_is_number(c.num_epochs) and c.num_epochs > 0),
        f'config.num_epochs must be a positive number, got {c.num_epochs!r}',
    )
    _check(
        errors,
        c.total_steps is None or _positive_int(c.total_steps),
        f'config.total_steps must be a positive integer or None, got {c.total_steps!r}',
    )
    _check(
        errors,
        _positive_int(c.checkpoint.every_steps),
        f'config.checkpoint.every_steps must be positive, got {c.checkpoint.every_steps!r}',
    )

    micro = 0
    if _positive_int(c.batch_size) and _positive_int(accum):
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
                not (c.data.mixup_alpha or c.data.cutmix_alpha)
                or not _positive_int(group)
                or local % group == 0,
                f'config.data.mix_group_size={group} does not divide the batch per process '
                f'({local}); MixUp/CutMix pair rows within such groups: set it to a divisor',
            )
            _check_bn_group(errors, c, micro)
    if _positive_int(eval_batch):
        _check(
            errors,
            eval_batch % device_count == 0,
            f'config.eval_batch_size={eval_batch} is not divisible by the {device_count} devices',
        )

    _check_paths(errors, c, workdir)
    # Techniques beyond the base recipe (off by default): each module checks its own section.
    for module in (loss_scale, distill, pruning):
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
            _positive_int(db.block_size),
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
        if info is not None and _positive_int(c.batch_size) and info['num_train'] < c.batch_size:
            errors.append(
                f'dataset {c.data.name!r} has {info["num_train"]} training examples, '
                f'fewer than one batch of {c.batch_size}'
            )
    model_ok = not _mentions(errors, 'config.model.', 'config.data.resolution')
    num_classes = (info['num_classes'] if info else c.data.num_classes) or 1
    _check_init_from(errors, c, workdir, num_classes if model_ok else None)
    if errors:
        raise ConfigError(format_problems('invalid config', errors))

    steps_per_epoch = max(1, info['num_train'] // c.batch_size)
    total = c.total_steps or max(1, int(math.ceil(c.num_epochs * steps_per_epoch)))
    eval_every = (
        max(1, int(round(c.eval_every_epochs * steps_per_epoch)))
        if (c.eval_every_epochs and c.eval_every_epochs > 0)
        else total
    )
    return RunPlan(
        num_classes=info['num_classes'],
        num_train=info['num_train'],
        num_eval=info['num_eval'],
        device_count=device_count,
        process_count=process_count,
        global_batch=c.batch_size,
        grad_accum_steps=accum,
        micro_batch=micro,
        local_micro_batch=micro // process_count,
        eval_batch=eval_batch,
        bn_group_size=bn_group_size(c),
        normalization=c.data.normalization or arch.get_variant(m.name).normalization,
        learning_rate=o.base_learning_rate * c.batch_size / 256.0,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=int(round(o.warmup_epochs * steps_per_epoch)),
        decay_steps=max(1, int(round(o.decay_epochs * steps_per_epoch))),
        total_micro_steps=total * accum,
        eval_every_micro_steps=min(eval_every, total) * accum,
        checkpoint_every_micro_steps=c.checkpoint.every_steps,
    )


def build_model(config: Any, num_classes: int) -> efficientnet.EfficientNet:
    """The model from ``config.model``; width/depth overrides give a custom-scaled member."""
    m = config.model
    return efficientnet.create_model(
        m.name,
        num_classes=num_classes,
        dtype=COMPUTE_DTYPES[m.compute_dtype],
        width=m.width,
        depth=m.depth,
        resolution=config.data.resolution,
        dropout_rate=m.dropout_rate,
        drop_path_rate=m.drop_path_rate,
        bn_group_size=bn_group_size(config),
        depthwise_impl=m.depthwise_impl,
        remat=m.get('remat', False),  # absent in the config.json of older runs
        scan_blocks=m.get('scan_blocks', False),  # older runs resume unscanned, bit-identical
        **dropblock_overrides(config),
    )


def dropblock_overrides(config: Any) -> dict[str, Any]:
    """The model options ``config.dropblock`` asks for (none when it is off)."""
    d = config.get('dropblock')
    if d is None or d.keep_prob >= 1.0:
        return {}
    return {'dropblock_stages': tuple(d.stages), 'dropblock_size': int(d.block_size)}


def write_resolved(config: Any, plan: RunPlan, workdir: str) -> str:
    """Writes the config and the derived plan to ``workdir/config.json`` (local or gs://,
    atomically); returns the path."""
    text = json.dumps(
        {'config': config.to_dict(), 'derived': plan.to_dict()},
        indent=2,
        sort_keys=True,
        default=str,
    )
    return paths.write_atomic(paths.as_path(workdir, 'config.json'), text)
