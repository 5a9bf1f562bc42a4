"""Top-k classes of images, with EfficientNet weights of any kind this project reads.

    python scripts/predict.py cat.jpg dog.png --weights b0.msgpack
    python scripts/predict.py photos/*.jpg --weights efficientnet-b0-355c32eb.pth --model b0
    python scripts/predict.py shoe.png --weights workdirs/quickstart --top 3
    python scripts/predict.py gs://bucket/cat.jpg --weights gs://bucket/b0   # paths may be gs://

Each image is preprocessed like evaluation (decode, centre crop S / (S + 32) or the weights'
crop fraction, resize to S with the variant's interpolation); the model normalises it as its
weights expect. Class names: ImageNet-1k's for 1000-class ImageNet weights
(efficientnet/imagenet_classes.txt), a workdir's dataset classes (an image folder's subfolder
names, Fashion-MNIST's), else class_<i>.

An image that cannot be read or decoded is reported as ``error: PATH: reason`` on stderr and
the others are still predicted. Exit status: 0 when at least one image was predicted; 2 when
none was (every image failed), or on bad input (weights missing or refused as an unsafe
pickle, a bad flag), after one line ``error: ...`` (``--verbose`` adds the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficientnet import cli  # noqa: E402
from inference.cli import SOURCE_HELP, add_weights_arguments  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog='python scripts/predict.py',
        description='Prints the top classes with probabilities for each image.',
    )
    p.add_argument('images', metavar='IMAGE', nargs='+', help='JPEG, PNG, BMP or GIF files')
    p.add_argument(
        '--weights',
        required=True,
        metavar='SOURCE',
        help=SOURCE_HELP,
    )
    add_weights_arguments(p)
    p.add_argument('--top', type=int, default=5, help='classes shown per image (default 5)')
    p.add_argument('--json', action='store_true', help='print one JSON object per image')
    return p.parse_args(argv)


def load_image(path: str, resolution: int, crop_fraction: float | None, interpolation: str):
    """uint8 [S, S, 3] through the pipeline's eval preprocessing; raises ValueError with the
    reason when the file cannot be read or decoded."""
    import tensorflow as tf

    from efficientnet import paths
    from input_pipeline import preprocessing

    try:
        data = paths.as_path(path).read_bytes()  # local or gs://
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from e
    if not data:
        raise ValueError('empty file')
    try:
        image = preprocessing.preprocess_eval(
            tf.constant(data), resolution, interpolation=interpolation, crop_fraction=crop_fraction
        )
        return image.numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.OpError) as e:
        # TF wraps the decoder's message in '{{function_node ...}} ... [Op:DecodeImage]'.
        reason = re.sub(r'\{\{.*?\}\}|\[Op:.*$', '', e.message or '').strip()
        raise ValueError(f'not a decodable image ({reason or type(e).__name__})') from e


def predict(loaded, paths: list[str], top: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """(predictions in input order, [(path, error message)] for images that failed)."""
    import numpy as np

    from inference.class_names import class_names

    names = class_names(loaded)
    images, ok, failed = [], [], []
    for path in paths:
        try:
            images.append(
                load_image(path, loaded.resolution, loaded.crop_fraction, loaded.interpolation)
            )
            ok.append(path)
        except ValueError as e:
            failed.append((path, str(e)))
    results = []
    if images:
        logits = loaded.logits(np.stack(images)).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top, probs.shape[1])
        for path, p in zip(ok, probs):
            order = np.argsort(-p, kind='stable')[:k]
            results.append(
                {
                    'image': path,
                    'top': [
                        {'label': int(i), 'name': names[i], 'probability': float(p[i])}
                        for i in order
                    ],
                }
            )
    return results, failed


def main(argv: list[str] | None = None) -> int:
    """0 when an image was predicted; 2 after one line ``error: ...`` otherwise."""
    return cli.run(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.top < 1:
        raise cli.UserError(f'--top must be positive, got {args.top}')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    from efficientnet import paths
    from inference.cli import load_model_for_tool

    bad = paths.problems([('--weights', args.weights)])
    if bad:
        raise cli.UserError(bad[0])
    loaded = load_model_for_tool(args.weights, args)
    if loaded.num_classes == 0:
        raise cli.UserError(f'{args.weights} has no classifier (a backbone); nothing to predict')
    results, failed = predict(loaded, args.images, args.top)
    for path, reason in failed:
        print(f'error: {path}: {reason}', file=sys.stderr)
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        print(r['image'])
        for t in r['top']:
            print(f'  {100 * t["probability"]:6.2f}%  {t["name"]}')
    if failed:
        print(
            f'{len(results)} of {len(args.images)} images predicted, {len(failed)} failed',
            file=sys.stderr,
        )
    return 0 if results else cli.EXIT_USER_ERROR


if __name__ == '__main__':
    sys.exit(main())
