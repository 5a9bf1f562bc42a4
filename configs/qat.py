"""Quantisation-aware training of a trained quickstart model to an int8 TFLite file
(docs/techniques.md): 500 Adam steps on the BatchNorm-folded network with fake-quant, then
the int8 .tflite and a comparison with the float model and post-training quantisation.

    python train.py --config=configs/quickstart.py --workdir=/tmp/fmnist_dense \
        --config.data.resolution=32 --config.num_epochs=15
    python scripts/qat.py --config=configs/qat.py --workdir=/tmp/fmnist_qat \
        --config.qat.init_from=/tmp/fmnist_dense

The training data are those of the --config.qat.init_from workdir's config.
"""

from configs import quickstart


def get_config():
    config = quickstart.small_config()
    config.qat.steps = 500
    config.qat.learning_rate = 1e-4
    return config
