"""Quantisation-aware training of a trained workdir to a fully int8 TFLite model.

    python train.py --config=configs/quickstart.py --workdir=/tmp/fmnist_dense \
        --config.data.resolution=32 --config.num_epochs=15
    python scripts/qat.py --config=configs/qat.py --workdir=/tmp/fmnist_qat \
        --config.qat.init_from=/tmp/fmnist_dense

Fine-tunes the BatchNorm-folded network of ``--config.qat.init_from`` with TF-exact fake-quant
for ``config.qat.steps`` Adam steps on that workdir's training data (training/qat.py), then
writes to ``--workdir``: ``qat.msgpack`` (folded weights and activation ranges),
``model_int8.tflite`` (int8 throughout: uint8 images in, float32 'logits' and 'probabilities'
out, like ``scripts/export.py``'s files) and, with ``config.qat.evaluate``, ``qat_eval.json``:
top-1 of the float model, of post-training int8, of the QAT model in JAX and of its TFLite
file on the eval split, their top-1 agreement and the largest logit difference in output steps.
Bad input (no or a missing workdir, weights that are not a workdir, a model the folded export
cannot build, a bad config value) ends with one line ``error: ...`` and exit status 2 before
anything compiles; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficientnet import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """0 on success, 2 after one line ``error: ...`` on bad input."""
    return cli.run(_main, argv)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv if argv is None else argv)
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'config file', flag_values=fv, lock_config=True)
    flags.DEFINE_string('workdir', None, 'where the QAT result goes', flag_values=fv)
    flags.DEFINE_boolean('verbose', False, cli.VERBOSE_HELP, flag_values=fv)
    saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
    try:
        rest = fv(argv)
    except Exception as e:  # noqa: BLE001 - flags.Error, and what config_flags lets through
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise cli.UserError(f'bad command line: {first}') from e
    finally:
        sys.argv = saved
    if len(rest) > 1:
        raise cli.UserError(f'unexpected arguments: {" ".join(rest[1:])}')
    if fv.config is None or fv.workdir is None:
        raise cli.UserError('--config=FILE and --workdir=DIR are required')
    from input_pipeline.pipeline import hide_accelerators_from_tensorflow
    from training import qat

    hide_accelerators_from_tensorflow()
    qat.run_qat(fv.config, fv.workdir, log=lambda s: print(s, flush=True))
    return 0


if __name__ == '__main__':
    sys.exit(main())
