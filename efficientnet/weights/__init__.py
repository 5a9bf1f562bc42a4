"""Every weight format into our variable tree: published weights (Keras, PyTorch, TF), our own
msgpack files, and the checkpoints train.py writes.

    variables = from_keras(keras_model, 'b0')                # keras.applications
    variables = from_torch('efficientnet-b0.pth', 'b0')      # efficientnet_pytorch naming
    variables = from_tf_checkpoint('efficientnet-b0/model.ckpt', 'b0')   # tensorflow/tpu
    save_variables('b0.msgpack', variables, 'b0')
    name, variables = load_variables('b0.msgpack')
    variables = train_state.read_variables(train_state.find_step_dir('/ckpt/b0'))  # train.py's

Each returns ``{'params': ..., 'batch_stats': ...}`` (nested dicts of float32 numpy arrays)
for ``create_model(name)``; every tensor must match both ways or a ``WeightsMismatchError``
(a ValueError) names the offenders. TensorFlow, Keras and PyTorch are imported only inside
the functions that read their formats, orbax inside ``train_state``. Each format's module
also tells how many classes a source's classifier has (``classifier_classes``). Command line:
``python -m efficientnet.weights``.
"""

from efficientnet.weights.core import WeightsMismatchError, target_shapes
from efficientnet.weights.keras_app import from_keras, keras_input_normalization
from efficientnet.weights.pytorch import from_torch
from efficientnet.weights.store import FORMAT_VERSION, load_variables, save_variables
from efficientnet.weights.tf_checkpoint import from_tf_checkpoint

__all__ = [
    'FORMAT_VERSION',
    'WeightsMismatchError',
    'from_keras',
    'from_tf_checkpoint',
    'from_torch',
    'keras_input_normalization',
    'load_variables',
    'save_variables',
    'target_shapes',
]
