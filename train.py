"""Trains and evaluates EfficientNet: flags -> config -> mesh -> state -> loop -> eval ->
checkpoints.

    python train.py --config=configs/b0.py --workdir=/tmp/b0 [--config.batch_size=1024 ...]
    python train.py --config=configs/b4.py --workdir=gs://bucket/b4     # on every worker of a pod

The workdir (checkpoints, config.json, TensorBoard events, data-iterator states) may be local or
gs://; process 0 writes the shared files, every process reads them.

Multi-process (docs/launch.md): on Cloud TPU VMs jax.distributed finds the slice itself; on GPU
clusters (and local tests) pass --coordinator_address=host:port --num_processes=N --process_id=i
on every process.
"""

from __future__ import annotations

if __name__ == '__main__':  # before the heavy imports: may re-execute under tcmalloc
    from training.allocator import use_tcmalloc

    use_tcmalloc()
    # Importing it quiets TensorFlow's start-up lines, which clu's import would print.
    from efficientnet import cli  # noqa: F401

import logging as py_logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from clu import metric_writers
from ml_collections import config_flags

import configs
from efficientnet import cli
from training import (
    allocator,
    compilation,
    config_resolve,
    data,
    distributed,
    progressive,
    sharding,
)
from training import checkpoint as ckpt_lib
from training import run as run_lib
from training import state as state_lib
from training.metrics import EvalAccumulator

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file.', lock_config=True)
flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, summaries, the config: local or gs://.'
)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'Index of this process (multi-process).')
flags.DEFINE_integer(
    'heartbeat_timeout',
    distributed.HEARTBEAT_TIMEOUT_S,
    'Seconds without a heartbeat after which a process of a multi-process run counts as dead '
    'and the others stop (multi-process).',
)
flags.DEFINE_bool('verbose', False, cli.VERBOSE_HELP)


class _QuietLibraries(py_logging.Filter):
    """Keeps orbax's per-save INFO chatter out of the run log (warnings still pass), and the
    tracebacks of its failed background saves: the run reports those itself in one line
    (``checkpoint.CheckpointError``), and stops."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if 'orbax' not in record.pathname:
            return True
        if record.exc_info:
            record.exc_info, record.exc_text = None, None
        return record.levelno >= py_logging.WARNING


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


def _init_state(run: run_lib.Run, ckpt: ckpt_lib.Checkpointer) -> tuple[Any, dict | None]:
    """Resumes from the workdir if it holds a checkpoint, else initialises (optionally from
    ``config.init_from``). Returns (state, data_state)."""
    config, tx, shardings = run.config, run.tx, run.state_shardings
    restored = ckpt.restore(run.abstract_state, shardings)  # the newest step that verifies
    if restored is not None:
        state, data_state = restored
        logging.info('resumed from step %d', int(state.step))
        return state, data_state
    state = run.init_state()
    if config.init_from:
        # Per block as saved; the run's state may hold each stage's repeats stacked.
        pre = state_lib.stacked_like(ckpt_lib.load_pretrained(config.init_from), state.params)
        params, fresh = ckpt_lib.merge_pretrained(state.params, pre['params'])
        stats, fresh_bs = ckpt_lib.merge_pretrained(state.batch_stats, pre['batch_stats'])
        # config_resolve checked this before anything compiled; the file may have changed since.
        foreign = ckpt_lib.untransferable(
            {'params': state.params, 'batch_stats': state.batch_stats}, pre
        )
        if foreign:
            raise config_resolve.ConfigError(
                f'config.init_from={config.init_from!r} does not fit config.model: '
                f'{len(foreign)} tensors are missing or of another shape, e.g. '
                f'{", ".join(foreign[:3])}; only the classifier may differ'
            )
        copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
        state = state.replace(
            params=params,
            batch_stats=stats,
            ema_params=copy(params),
            ema_batch_stats=copy(stats),
            opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
        )
        logging.info(
            'initialised from %s; re-initialised: %s',
            config.init_from,
            fresh + fresh_bs or 'nothing',
        )
    return state, None


def evaluate(eval_step: Any, state: Any, config: Any, plan: Any, mesh: Any) -> dict[str, float]:
    """One exact pass over the eval split for the raw and the EMA weights."""
    outs = []
    for batch in data.create_eval_iterator(config.data, global_batch_size=plan.eval_batch):
        outs.append(eval_step(state, sharding.global_batch(batch, mesh)))
    result = {}
    for name in ('raw', 'ema'):
        acc = EvalAccumulator()
        for o in outs:
            acc.add(o[name])
        r = acc.result()
        if r['count'] != plan.num_eval:
            raise RuntimeError(
                f'evaluation counted {r["count"]} examples but the split has '
                f'{plan.num_eval}: the eval masks are wrong'
            )
        result.update({f'eval/{name}_{k}': v for k, v in r.items() if k != 'count'})
    result['eval/count'] = plan.num_eval
    return result


def train_and_evaluate(config: Any, workdir: str, started: float | None = None) -> dict[str, float]:
    """Runs (or resumes) training in ``workdir``; returns the final eval metrics. ``started``
    (a ``time.time()``) is where the logged time to the first step counts from; default: now."""
    started = started or time.time()
    plan = config_resolve.resolve(
        config,
        device_count=jax.device_count(),
        process_count=jax.process_count(),
        workdir=workdir,
    )
    for k, v in plan.to_dict().items():
        logging.info('derived %s = %s', k, v)
    # Before anything is written: create_run reads a distillation teacher, which may fail.
    run = run_lib.create_run(config, plan)
    if jax.process_index() == 0:
        config_resolve.write_resolved(config, plan, workdir)
    # TensorBoard (and the sweep and plot tools that read its event files) keeps every scalar;
    # the console gets train.py's own one line per report below, not clu's logging writer too.
    writers = [metric_writers.SummaryWriter(workdir)] if jax.process_index() == 0 else []
    writer = metric_writers.AsyncMultiWriter(writers)

    mesh, train_step, eval_step = run.mesh, run.train_step, run.eval_step

    ckpt = ckpt_lib.Checkpointer(
        workdir,
        keep=config.checkpoint.keep,
        keep_best=config.checkpoint.keep_best,
        async_save=config.checkpoint.async_save,
    )
    state, data_state = _init_state(run, ckpt)
    step = int(jax.device_get(state.step))

    total = plan.total_micro_steps
    ckpt_every = plan.checkpoint_every_micro_steps
    is_ckpt_step = lambda s: (
        s % ckpt_every == 0 or s == total or s % plan.eval_every_micro_steps == 0
    )
    # Progressive learning (training/progressive.py): the stage follows from the step alone,
    # so a resumed run continues in its stage, at the stage's size and strength.
    stages = progressive.plan_stages(config, plan)
    stage = progressive.stage_at(stages, step) if stages else None
    iterator = data.create_train_iterator(
        config.data,
        global_batch_size=plan.micro_batch,
        seed=config.seed,
        start_step=step,
        overrides=progressive.data_overrides(stage.stage) if stage else None,
    )
    # The same stream on any process or device count; another seed, dataset or batch is refused.
    if data_state is not None and iterator.stream.check_resume(data_state) != step:
        raise ValueError(f'the checkpoint at step {step} holds the data state of another step')

    def enter_stage(stage: progressive.StageSteps | None) -> tuple[Any, Any]:
        """The batches and the train step from ``step`` on, to the end of ``stage``."""
        if stage is None:
            return data.DevicePrefetcher(iterator, mesh, depth=config.prefetch_batches), train_step
        logging.info('%s', progressive.describe(stage, len(stages), config.data))
        prefetcher = data.DevicePrefetcher(
            iterator, mesh, depth=config.prefetch_batches, stop=stage.end
        )
        return prefetcher, run.stage_train_step(stage.stage.dropout)

    batches, stage_step = enter_stage(stage)

    pending: list[tuple[int, dict]] = []  # per-step device metrics since the last flush
    last_eval: dict[str, float] = {}
    t_log, steps_at_log, first_step_time = time.time(), step, None
    tracing = False

    def flush() -> dict[str, float]:
        """Fetches pending metrics; raises on the first non-finite loss, naming its step."""
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            # A step that loss scaling skipped (grads_finite 0) changed nothing but the scale.
            if not np.isfinite(m['total_loss']) and m.get('grads_finite', 1.0):
                raise FloatingPointError(
                    f'non-finite loss {float(m["total_loss"])} at step {s} (1-based); the last '
                    f'good checkpoint in {ckpt.workdir} is kept (step {ckpt.latest_step()})'
                )
        pending.clear()
        return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]} if fetched else {}

    def save(step: int) -> None:
        flush()  # never checkpoint a state that followed a non-finite loss
        ckpt.save(step, state, iterator.stream.at(step))

    try:
        with distributed.Preemption() as preemption:
            logging.info(
                'training from step %d to %d (%d images per step, %d devices, %d processes)',
                step,
                total,
                plan.micro_batch,
                plan.device_count,
                plan.process_count,
            )
            while step < total:
                if preemption.reached(step):
                    logging.warning('preemption requested: saving at step %d and exiting', step)
                    save(step)
                    ckpt.close()
                    writer.flush()
                    return {'preempted_at_step': step, **last_eval}
                if config.profile.start_step >= 0:
                    if step == config.profile.start_step and not tracing:
                        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
                        tracing = True
                    elif tracing and step >= config.profile.start_step + config.profile.num_steps:
                        jax.profiler.stop_trace()
                        tracing = False
                new_stage = stage is not None and step >= stage.end
                if new_stage:
                    stage = progressive.stage_at(stages, step)
                    iterator.restart(step, progressive.data_overrides(stage.stage))
                    batches, stage_step = enter_stage(stage)
                state, metrics = stage_step(state, batches.next())
                step += 1
                ckpt.check()  # a save that failed in the background stops the run here
                pending.append((step, metrics))
                if new_stage:  # its compilation stays out of the step time and the ETA
                    jax.block_until_ready(metrics)
                    t_log, steps_at_log = time.time(), step
                if first_step_time is None:
                    jax.block_until_ready(metrics)
                    first_step_time = time.time() - started
                    cache = compilation.cache_stats()
                    logging.info(
                        'first step done %.1fs after the start (initialisation and '
                        'compilation included; %d of %d programs loaded from the '
                        'persistent compilation cache)',
                        first_step_time,
                        cache['cache_hits'],
                        cache['compile_requests_use_cache'],
                    )
                    t_log, steps_at_log = time.time(), step
                if step % config.log_every_steps == 0 or step == total:
                    scalars = flush()
                    now = time.time()
                    dt = (now - t_log) / max(step - steps_at_log, 1)
                    t_log, steps_at_log = now, step
                    epoch = step / plan.grad_accum_steps / plan.steps_per_epoch
                    scalars.update(
                        {
                            'train/images_per_sec': plan.micro_batch / dt,
                            'train/step_time_ms': 1000 * dt,
                            'train/epoch': epoch,
                        }
                    )
                    if stage is not None:
                        scalars['train/resolution'] = stage.stage.resolution
                    scalars = {k if '/' in k else f'train/{k}': v for k, v in scalars.items()}
                    writer.write_scalars(step, scalars)
                    logging.info(
                        'step %d/%d (%.1f%%) epoch %.2f | loss %.4f top1 %.3f lr %.5f '
                        'grad_norm %.3f | %.1f img/s %.0f ms/step | ETA %s',
                        step,
                        total,
                        100 * step / total,
                        scalars['train/epoch'],
                        scalars['train/loss'],
                        scalars['train/top1'],
                        scalars['train/learning_rate'],
                        scalars['train/grad_norm'],
                        scalars['train/images_per_sec'],
                        scalars['train/step_time_ms'],
                        _format_eta(dt * (total - step)),
                    )
                if is_ckpt_step(step):
                    save(step)
                if step % plan.eval_every_micro_steps == 0 or step == total:
                    last_eval = evaluate(eval_step, state, config, plan, mesh)
                    writer.write_scalars(step, last_eval)
                    # Six significant digits: what scripts/eval.py reports can be checked
                    # against this line.
                    logging.info(
                        'eval at step %d epoch %.2f | top1 %.6g (EMA %.6g) top5 %.6g (EMA %.6g) '
                        'loss %.6g (EMA %.6g) on %d examples',
                        step,
                        step / plan.grad_accum_steps / plan.steps_per_epoch,
                        last_eval['eval/raw_top1'],
                        last_eval['eval/ema_top1'],
                        last_eval['eval/raw_top5'],
                        last_eval['eval/ema_top5'],
                        last_eval['eval/raw_loss'],
                        last_eval['eval/ema_loss'],
                        plan.num_eval,
                    )
                    ckpt.save_best(step, state, last_eval['eval/ema_top1'])
    except BaseException:
        try:  # let in-flight saves finish; the last good checkpoint stays intact
            ckpt.close()
        except ckpt_lib.CheckpointError as e:  # reported here; the first error goes on
            logging.error('%s', e)
        raise
    if tracing:
        jax.profiler.stop_trace()
    if not last_eval:  # resumed a finished run: evaluate what was restored
        last_eval = evaluate(eval_step, state, config, plan, mesh)
    ckpt.close()  # CheckpointError if the last save failed
    writer.flush()
    return {**last_eval, 'step': step}


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but every bad flag is reported together, one line each (absl stops
    at the first with a fatal message; an unknown config key gave chained tracebacks)."""
    try:
        return FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags.Error, and what config_flags lets through
        error = e
    args = argv[1:]
    spec = next((a.split('=', 1)[1] for a in args if a.startswith('--config=')), None)
    overrides = [a for a in args if a.startswith(('--config.', '--noconfig.'))]
    problems = configs.override_problems(spec, overrides) if spec else []
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    keys = [a.split('=', 1)[0].split('.', 1)[1] for a in overrides]
    if not problems or not any(k in first for k in ['config', *keys]):
        problems.append(first)  # a flag of train.py's own, which the config check cannot see
    raise cli.UserError(cli.format_problems('bad command line', problems))


def main(argv: list[str]) -> None:
    started = time.time()
    cli.die_with_parent_if_asked()  # under scripts/sweep.py or scripts/noisy_student.py
    if len(argv) > 1:
        raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
    if FLAGS.config is None or FLAGS.workdir is None:
        raise cli.UserError('--config=FILE and --workdir=DIR are required')
    distributed.initialize(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        heartbeat_timeout_s=FLAGS.heartbeat_timeout,
    )
    from input_pipeline.pipeline import hide_accelerators_from_tensorflow

    hide_accelerators_from_tensorflow()  # the input pipeline must not take GPU/TPU memory
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    compilation.enable_persistent_cache(FLAGS.config.compilation_cache_dir)
    logging.info(
        'JAX %s, %d processes, %d devices (%s); memory allocator: %s',
        jax.__version__,
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].platform,
        allocator.describe(),
    )
    try:
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir, started)
    except (FloatingPointError, ckpt_lib.CheckpointError) as e:  # diverged, or a save failed
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(1)
    except jax.errors.JaxRuntimeError as e:
        # A collective or barrier failed: if a peer died, jax names it and ends this process
        # within the heartbeat timeout; wait for that rather than end with a transport error.
        distributed.wait_for_lost_peer(e)
        raise
    if 'preempted_at_step' in result:
        print(
            f'Preempted: saved at step {result["preempted_at_step"]}; rerun the same command '
            'to resume.',
            flush=True,
        )
        return
    print(
        f'Final eval top-1: {100 * result["eval/ema_top1"]:.2f}% (EMA weights), '
        f'{100 * result["eval/raw_top1"]:.2f}% (raw weights), step {result["step"]}',
        flush=True,
    )


if __name__ == '__main__':
    # Bad input (flags, config, paths) ends with one line and exit status 2; --verbose adds the
    # traceback (efficientnet/cli.py).
    sys.exit(cli.run(lambda argv: app.run(main, argv=argv, flags_parser=_parse_flags)))
