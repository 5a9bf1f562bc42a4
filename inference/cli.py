"""The command-line face of ``load_model`` that scripts/eval.py and scripts/predict.py share:
the options that say which weights to load and how, and the load itself."""

from __future__ import annotations

import argparse

from efficientnet.cli import UserError
from efficientnet.layers import DEPTHWISE_IMPLS
from efficientnet.normalization import NORMALIZATIONS
from inference.loaded_model import LoadedModel
from inference.loading import FORMATS, detect_format, load_model

SOURCE_HELP = 'training workdir, .msgpack, Keras .h5, PyTorch .pth or TF checkpoint'


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --format, --no-ema, --normalization and --depthwise-impl."""
    parser.add_argument(
        '--model', help='variant (b0 ... b7, lite0 ...); required for keras/torch/tf'
    )
    parser.add_argument('--format', default='auto', choices=('auto', *FORMATS))
    parser.add_argument('--no-ema', action='store_true', help='raw weights, not the EMA copy')
    parser.add_argument(
        '--normalization',
        choices=sorted(NORMALIZATIONS),
        help="override the input normalisation ('advprop' for AdvProp weights)",
    )
    parser.add_argument('--depthwise-impl', default='auto', choices=DEPTHWISE_IMPLS)


def load_model_for_tool(source: str, args: argparse.Namespace) -> LoadedModel:
    """``load_model(source)`` with the options of ``add_weights_arguments``, for tools that also
    decode images with TensorFlow: the format is detected first (a missing path fails at once),
    then TensorFlow is kept off the GPUs (they are JAX's) before anything starts it, then the
    weights load. A ValueError of the loaders (weights that do not fit, an unknown variant)
    becomes a UserError; a missing file stays a FileNotFoundError: both end the tool with one
    line and exit status 2 (``efficientnet.cli.run``)."""
    try:
        fmt = detect_format(source) if args.format == 'auto' else args.format
        from input_pipeline.pipeline import hide_accelerators_from_tensorflow

        hide_accelerators_from_tensorflow()
        return load_model(
            source,
            model=args.model,
            fmt=fmt,
            use_ema=not args.no_ema,
            depthwise_impl=args.depthwise_impl,
            normalization=args.normalization,
        )
    except ValueError as e:  # weights of another model, an unknown variant: the user's input
        raise UserError(str(e)) from e
