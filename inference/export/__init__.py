"""Export of a trained EfficientNet: TF SavedModel (jax2tf), TFLite float and int8, ONNX.

Every exporter takes the flax module and its ``{'params', 'batch_stats'}`` variables (what
``inference.loading.load_model`` returns), an optional resolution (the variant's by default)
and the input normalisation (a ``efficientnet.normalization.NORMALIZATIONS`` name or a (mean, std)
pair; the variant's by default). Every exported model takes uint8 images [N, S, S, 3] and
returns float32 'logits' and 'probabilities'. ``run_*`` run an exported file with its own
runtime (TF, the TFLite interpreter, onnxruntime), for checks. See docs/export.md;
``convert_qat_tflite`` converts a quantisation-aware-trained network (``quant``, and
docs/techniques.md).
"""

from inference.export.network import FoldedNetwork, check_exportable, fold_network
from inference.export.onnx_export import build_onnx, export_onnx, run_onnx
from inference.export.savedmodel import export_savedmodel, run_savedmodel
from inference.export.tflite import (
    convert_qat_tflite,
    convert_tflite,
    export_tflite,
    int8_problems,
    run_tflite,
)

__all__ = [
    'FoldedNetwork',
    'build_onnx',
    'check_exportable',
    'convert_qat_tflite',
    'convert_tflite',
    'export_onnx',
    'export_savedmodel',
    'export_tflite',
    'fold_network',
    'int8_problems',
    'run_onnx',
    'run_savedmodel',
    'run_tflite',
]
