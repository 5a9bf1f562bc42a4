"""Exports weights to a TF SavedModel, TFLite (float or int8) or ONNX, and checks the result.

    python scripts/export.py b0.msgpack --format savedmodel --output export/b0 --check
    python scripts/export.py /ckpt/b0 --format tflite --output b0.tflite --check
    python scripts/export.py b0.msgpack --format tflite-int8 --output b0_int8.tflite \
        --representative-folder ~/calib_images --check
    python scripts/export.py effnet.pth --model b0 --format onnx --output b0.onnx --check
    python scripts/export.py gs://bucket/b0 --format onnx --output gs://bucket/b0.onnx --check

SOURCE is anything ``inference.loading.load_model`` reads (a training workdir, a .msgpack from
``python -m efficientnet.weights``, Keras .h5, PyTorch .pth, an official TF checkpoint with
``--model``), local or gs://; ``--output`` and ``--representative-folder`` may be gs:// too.
Every export takes uint8 RGB images [N, S, S, 3] (resizing and cropping are the
caller's job) and returns 'logits' and 'probabilities'; see docs/export.md.

int8 needs ``--representative-folder``: its images go through the eval preprocessing (centre
crop, resize to S); the first ``--num-calibration`` (at most 80% of them) calibrate, the rest are
held out for ``--check``. ``--check`` runs the exported file with its own runtime (TF, the TFLite
interpreter, onnxruntime) beside the JAX model: float exports must match within
``FLOAT_TOLERANCE`` of the largest logit (on the held-out images, else on random images), int8
must agree on top-1 for at least ``INT8_MIN_AGREEMENT`` of the held-out images; exit status 1
otherwise. Bad input (missing weights, weights of another variant, a refused unsafe pickle, a
bad flag) exits 2 after one line ``error: ...``; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficientnet import cli  # noqa: E402

FORMATS = ('savedmodel', 'tflite', 'tflite-int8', 'onnx')
FLOAT_TOLERANCE = 1e-4  # max |logit diff| / max |logit|; measured ~1e-6 (docs/export.md)
INT8_MIN_AGREEMENT = 0.95
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


class UsageError(cli.UserError):
    """Bad input: reported as 'error: ...' with exit status 2, no traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from efficientnet.normalization import NORMALIZATIONS

    p = cli.ArgumentParser(
        prog='python scripts/export.py',
        description='Export EfficientNet weights to SavedModel, TFLite (float/int8) or ONNX.',
    )
    p.add_argument(
        'source',
        metavar='SOURCE',
        help='training workdir, .msgpack, Keras .h5, PyTorch .pth or TF checkpoint',
    )
    p.add_argument('--format', required=True, choices=FORMATS, dest='fmt')
    p.add_argument(
        '--output', required=True, help='file (.tflite, .onnx) or SavedModel dir; local or gs://'
    )
    p.add_argument('--model', help='variant (b0 ... b7, lite0 ...); required for keras/torch/tf')
    p.add_argument('--no-ema', action='store_true', help='raw weights, not the EMA copy')
    p.add_argument(
        '--normalization',
        choices=sorted(NORMALIZATIONS),
        help="input normalisation (default: the weights' own)",
    )
    p.add_argument('--resolution', type=int, help="input size S (default: the weights' own)")
    p.add_argument(
        '--representative-folder',
        metavar='DIR',
        help='images for int8 calibration (and held-out images for --check)',
    )
    p.add_argument(
        '--num-calibration',
        type=int,
        default=200,
        help='calibration images for int8 (default 200; at most 80%% of the folder)',
    )
    p.add_argument(
        '--crop-fraction',
        type=float,
        help='centre-crop fraction for folder images (default: S / (S + 32))',
    )
    p.add_argument(
        '--check',
        action='store_true',
        help='run the export beside the JAX model and compare (exit 1 on failure)',
    )
    p.add_argument(
        '--check-images',
        type=int,
        default=256,
        help='at most this many images for --check (default 256)',
    )
    args = p.parse_args(argv)
    if args.fmt == 'tflite-int8' and not args.representative_folder:
        p.error('--format tflite-int8 needs --representative-folder DIR (calibration images)')
    if args.num_calibration < 1 or args.check_images < 1:
        p.error('--num-calibration and --check-images must be positive')
    return args


def folder_images(folder: str, resolution: int, crop_fraction: float | None, interpolation: str):
    """uint8 [N, S, S, 3] of every image under ``folder`` (sorted by path), through the eval
    preprocessing; UsageError when there is none or one cannot be decoded."""
    import numpy as np
    import tensorflow as tf

    from efficientnet import paths
    from input_pipeline import preprocessing

    if not paths.as_path(folder).is_dir():
        raise UsageError(f'representative folder not found: {folder}')
    files = sorted(
        os.path.join(root, name)
        for root, _, names in paths.as_path(folder).walk()
        for name in names
        if name.lower().endswith(IMAGE_SUFFIXES)
    )
    if len(files) < 2:
        raise UsageError(
            f'{folder} holds {len(files)} images ({", ".join(IMAGE_SUFFIXES)}); '
            'int8 calibration needs real images, a few hundred ideally'
        )
    images = []
    for path in files:
        data = paths.as_path(path).read_bytes()
        try:
            image = preprocessing.preprocess_eval(
                tf.constant(data),
                resolution,
                interpolation=interpolation,
                crop_fraction=crop_fraction,
            )
        except tf.errors.OpError as e:
            raise UsageError(f'cannot decode {path}: {type(e).__name__}') from e
        images.append(image.numpy())
    return np.stack(images).astype(np.uint8)


def export(args: argparse.Namespace, loaded, resolution: int, calibration) -> None:
    from inference import export as ex

    common = dict(resolution=resolution, normalization=loaded.normalization)
    if args.fmt == 'savedmodel':
        ex.export_savedmodel(loaded.model, loaded.variables, args.output, **common)
    elif args.fmt == 'onnx':
        ex.export_onnx(loaded.model, loaded.variables, args.output, **common)
    else:
        quantization = 'int8' if args.fmt == 'tflite-int8' else None
        ex.export_tflite(
            loaded.model,
            loaded.variables,
            args.output,
            quantization=quantization,
            representative_images=calibration,
            **common,
        )


def check(args: argparse.Namespace, loaded, images) -> bool:
    """Runs the exported file and the JAX model on ``images``; prints and returns the verdict."""
    import numpy as np

    from inference import export as ex

    runners = {
        'savedmodel': ex.run_savedmodel,
        'onnx': ex.run_onnx,
        'tflite': ex.run_tflite,
        'tflite-int8': ex.run_tflite,
    }
    out = runners[args.fmt](args.output, images)
    want = loaded.logits(images)
    got = out['logits']
    diff = float(np.max(np.abs(got - want)))
    rel = diff / max(float(np.max(np.abs(want))), 1e-12)
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    print(
        f'check on {len(images)} images: max |logit diff| {diff:.3g} '
        f'({rel:.3g} of the largest logit), top-1 agreement {agree:.4f}'
    )
    if args.fmt == 'tflite-int8':
        ok = agree >= INT8_MIN_AGREEMENT
        print(
            f'check {"passed" if ok else "FAILED"}: top-1 agreement {agree:.4f} '
            f'{">=" if ok else "<"} {INT8_MIN_AGREEMENT}'
        )
    else:
        ok = rel <= FLOAT_TOLERANCE
        print(
            f'check {"passed" if ok else "FAILED"}: relative difference {rel:.3g} '
            f'{"<=" if ok else ">"} {FLOAT_TOLERANCE}'
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    """0 on success, 1 when ``--check`` fails, 2 after one line ``error: ...`` on bad input."""
    return cli.run(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    from efficientnet import paths
    from inference.loading import load_model

    start = time.time()
    try:
        bad = paths.problems(
            [
                ('', args.source),
                ('--output', args.output),
                ('--representative-folder', args.representative_folder),
            ]
        )
        if bad:
            raise UsageError('\n  '.join(bad))
        loaded = load_model(
            args.source, model=args.model, use_ema=not args.no_ema, normalization=args.normalization
        )
        if loaded.num_classes < 1:
            raise UsageError(
                f'{args.source} has no classifier (pooled features only); the '
                'exports return logits and probabilities'
            )
        resolution = args.resolution or loaded.resolution
        calibration = held_out = None
        if args.representative_folder:
            crop = args.crop_fraction
            if crop is None and args.resolution is None:
                crop = loaded.effective_crop_fraction
            images = folder_images(
                args.representative_folder, resolution, crop, loaded.interpolation
            )
            n = min(args.num_calibration, max(1, int(len(images) * 0.8)))
            calibration, held_out = images[:n], images[n:]
        print(
            f'loaded {loaded.name} ({loaded.num_classes} classes, {resolution} px, '
            f'{loaded.normalization} normalisation) from {args.source}'
        )
        export(args, loaded, resolution, calibration)
    except ValueError as e:  # weights of another variant, an unknown name: the user's input
        raise UsageError(str(e)) from e
    print(f'wrote {args.fmt} to {args.output} in {time.time() - start:.1f} s')
    if not args.check:
        return 0
    import numpy as np

    if held_out is not None and len(held_out):
        images = held_out[: args.check_images]
    else:
        images = np.random.default_rng(0).integers(
            0, 256, (min(args.check_images, 16), resolution, resolution, 3), dtype=np.uint8
        )
        print('no held-out images: checking on random images')
    return 0 if check(args, loaded, images) else 1


if __name__ == '__main__':
    sys.exit(main())
