"""Quantisation-aware training (QAT) to an int8 TFLite model: a short fine-tune of the
BatchNorm-folded network of a trained workdir with TF-exact fake-quant (docs/techniques.md).

BatchNorm is folded with its moving statistics and frozen (``fold_network``), so the network
trained here is the very function that ``tf_graph.QuantTFOps`` rebuilds and the converter
turns into int8: the folded kernels and biases are the parameters, the activation ranges
(``quant.QuantOps``) are state that only the training step moves. The data are the training
split of the source workdir's ``config.data``, through the project's input pipeline.

This is a separate, small loop (one jitted step, Adam, no mesh: one device), run by
``scripts/qat.py``; ``train.py`` never imports it. It reads the trained model through
``inference`` (the loader and the folded network), which is why it lives apart from the
training run's modules.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from efficientnet import cli, paths
from inference.export import quant

TFLITE_FILE = 'model_int8.tflite'
EVAL_FILE = 'qat_eval.json'


def config_problems(qat: Any) -> list[str]:
    """What is wrong with ``config.qat``, one line each."""
    problems = []
    if not qat.init_from:
        problems.append('config.qat.init_from must name the trained workdir to fine-tune')
    for name in ('steps', 'batch_size'):
        v = qat[name]
        if not (isinstance(v, int) and v >= 1):
            problems.append(f'config.qat.{name} must be a positive integer, got {v!r}')
    if not qat.learning_rate > 0:
        problems.append(f'config.qat.learning_rate must be > 0, got {qat.learning_rate}')
    if not 0.0 <= qat.range_decay < 1.0:
        problems.append(f'config.qat.range_decay must be in [0, 1), got {qat.range_decay}')
    return problems


def make_train_step(tx: optax.GradientTransformation, *, decay: float, label_smoothing: float):
    """(net, ranges, opt_state, images, labels) -> (net, ranges, opt_state, metrics), jitted.
    ``labels``: int [B], or mixed targets [B, classes]."""

    def step(net, ranges, opt_state, images, labels):
        def loss_fn(net):
            logits, _, new_ranges = quant.qat_forward(net, ranges, images, train=True, decay=decay)
            if labels.ndim == 1:
                targets = jax.nn.one_hot(labels, logits.shape[-1])
            else:
                targets = labels
            targets = optax.smooth_labels(targets, label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (new_ranges, logits)

        (loss, (new_ranges, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(net)
        updates, opt_state = tx.update(grads, opt_state, net)
        net = optax.apply_updates(net, updates)
        hard = labels if labels.ndim == 1 else labels.argmax(-1)
        top1 = jnp.mean(logits.argmax(-1) == hard)
        return net, new_ranges, opt_state, {'loss': loss, 'top1': top1}

    return jax.jit(step, donate_argnums=(0, 1, 2))


@jax.jit
def _predict(net, ranges, images):
    return quant.qat_forward(net, ranges, images)[0]


def qat_logits(net: Any, ranges: dict, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits of the fake-quantised network (fixed ranges) on uint8 images, in batches."""
    out = [
        np.asarray(_predict(net, ranges, images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def load_source(qat: Any) -> tuple[Any, Any, ml_collections.ConfigDict]:
    """(loaded model, folded network, its data config) of ``qat.init_from``; a UserError in
    one line when it is not a workdir or cannot be folded, before anything compiles."""
    from inference.export.network import fold_network
    from inference.loading import load_model

    loaded = load_model(qat.init_from, use_ema=qat.use_ema)
    if loaded.data_config is None:
        raise cli.UserError(
            f'config.qat.init_from={qat.init_from} is not a training workdir: QAT trains on '
            "the workdir's own config.data"
        )
    try:
        net = fold_network(
            loaded.model,
            loaded.variables,
            resolution=loaded.resolution,
            normalization=loaded.normalization,
        )
        x = jax.ShapeDtypeStruct((1, net.resolution, net.resolution, 3), jnp.uint8)
        jax.eval_shape(lambda n, x: quant.qat_forward(n, None, x), net, x)  # traces, no compile
    except ValueError as e:
        raise cli.UserError(f'{loaded.name} from {qat.init_from} cannot be quantised: {e}') from e
    return loaded, net, ml_collections.ConfigDict(loaded.data_config)


def run_qat(config: Any, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Fine-tunes ``config.qat.init_from`` with fake-quant, writes ``qat.msgpack`` and the int8
    ``model_int8.tflite`` to ``workdir``; with ``config.qat.evaluate`` also the comparison on
    the eval split (``qat_eval.json``). Returns the evaluation (or {'steps'})."""
    from inference import export as ex
    from training import data as data_lib

    qat = config.qat
    problems = config_problems(qat)
    if problems:
        raise cli.UserError(cli.format_problems('invalid config', problems))
    loaded, net, data_config = load_source(qat)
    log(
        f'QAT of {loaded.name} ({loaded.num_classes} classes, {net.resolution} px) from '
        f'{qat.init_from} step {loaded.step}, {qat.steps} steps at batch {qat.batch_size}'
    )
    train_iter = data_lib.create_train_iterator(
        data_config, global_batch_size=qat.batch_size, seed=qat.seed
    )
    schedule = optax.cosine_decay_schedule(qat.learning_rate, qat.steps)
    tx = optax.adam(schedule)
    step_fn = make_train_step(tx, decay=qat.range_decay, label_smoothing=qat.label_smoothing)
    first = next(train_iter)
    # The ranges start at the first batch's min/max, measured through the fake-quant network.
    ranges = jax.jit(lambda n, x: quant.qat_forward(n, None, x)[2])(net, first['image'])
    net = jax.tree.map(jnp.asarray, net)
    opt_state = tx.init(net)
    batch, start = first, time.time()
    for step in range(1, qat.steps + 1):
        net, ranges, opt_state, metrics = step_fn(
            net, ranges, opt_state, batch['image'], batch['label']
        )
        if step % 50 == 0 or step == qat.steps:
            m = jax.device_get(metrics)
            log(
                f'step {step}/{qat.steps} loss {m["loss"]:.4f} top1 {m["top1"]:.3f} '
                f'({time.time() - start:.0f} s)'
            )
        if step < qat.steps:
            batch = next(train_iter)
    net, ranges = jax.device_get((net, ranges))
    ranges = {k: np.asarray(v) for k, v in ranges.items()}
    info = {
        'source': str(qat.init_from),
        'source_step': int(loaded.step or 0),
        'name': loaded.name,
        'normalization': str(loaded.normalization),
        'steps': int(qat.steps),
    }
    paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
    quant.save_qat(str(paths.as_path(workdir, quant.QAT_FILE)), net, ranges, info)
    data = ex.convert_qat_tflite(net, ranges)
    paths.write_atomic(str(paths.as_path(workdir, TFLITE_FILE)), data)
    log(f'wrote {quant.QAT_FILE} and {TFLITE_FILE} ({len(data)} bytes, int8) to {workdir}')
    if not qat.evaluate:
        return {'steps': qat.steps}
    result = evaluate(loaded, net, ranges, data, data_config, qat.num_calibration, log)
    paths.write_atomic(str(paths.as_path(workdir, EVAL_FILE)), json.dumps(result, indent=2))
    return result


def split_images(data_config: Any, split: str, limit: int | None = None) -> tuple:
    """(uint8 images, labels) of ``split`` through the eval preprocessing, every example once."""
    from training import data as data_lib

    cfg = ml_collections.ConfigDict(data_config.to_dict())
    cfg.eval_split = split
    images, labels = [], []
    for b in data_lib.create_eval_iterator(cfg, global_batch_size=500):
        images.append(b['image'][b['mask']])
        labels.append(b['label'][b['mask']])
        if limit is not None and sum(len(x) for x in images) >= limit:
            break
    images, labels = np.concatenate(images), np.concatenate(labels)
    return images[:limit], labels[:limit]


def evaluate(loaded, net, ranges, qat_tflite: bytes, data_config, num_calibration, log) -> dict:
    """Top-1 on the eval split of the float model, its post-training int8 TFLite (calibrated
    on ``num_calibration`` training images), the QAT model in JAX and its int8 TFLite; the
    TFLite/JAX top-1 agreement and the largest logit difference in output steps."""
    from inference import export as ex

    images, labels = split_images(data_config, data_config.get('eval_split', 'validation'))
    calibration, _ = split_images(
        data_config, data_config.get('train_split', 'train'), num_calibration
    )
    ptq = ex.convert_tflite(
        loaded.model,
        loaded.variables,
        quantization='int8',
        representative_images=list(calibration),
        resolution=net.resolution,
        normalization=loaded.normalization,
    )
    logits = {
        'float': loaded.logits(images),
        'ptq_int8_tflite': ex.run_tflite(ptq, images, batch_size=100)['logits'],
        'qat_jax': qat_logits(net, ranges, images),
        'qat_int8_tflite': ex.run_tflite(qat_tflite, images, batch_size=100)['logits'],
    }
    top1 = {k: float(np.mean(v.argmax(-1) == labels)) for k, v in logits.items()}
    jax_l, lite_l = logits['qat_jax'], logits['qat_int8_tflite']
    step = quant.logits_step(ranges)
    result = {
        'examples': int(len(labels)),
        'top1': top1,
        'agreement_tflite_vs_jax': float(np.mean(jax_l.argmax(-1) == lite_l.argmax(-1))),
        'max_logit_diff': float(np.max(np.abs(jax_l - lite_l))),
        'max_logit_diff_lsb': float(np.max(np.abs(jax_l - lite_l)) / step),
        'logits_step': step,
    }
    log(
        f'on {len(labels)} eval images: top-1 float {top1["float"]:.4f}, PTQ int8 '
        f'{top1["ptq_int8_tflite"]:.4f}, QAT JAX {top1["qat_jax"]:.4f}, QAT int8 TFLite '
        f'{top1["qat_int8_tflite"]:.4f}; TFLite/JAX agreement '
        f'{result["agreement_tflite_vs_jax"]:.4f}, max logit diff '
        f'{result["max_logit_diff"]:.4g} = {result["max_logit_diff_lsb"]:.2f} LSB'
    )
    return result
