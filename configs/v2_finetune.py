"""Fine-tunes a pretrained EfficientNetV2 on an image folder (root/<class>/<image>).

    python train.py --config=configs/v2_finetune.py --workdir=/ckpt/flowers-v2 \
        --config.init_from=v2-s.msgpack --config.data.folder=/data/flowers

The transfer schedule of ``configs/finetune.py`` (10 epochs, SGD with Nesterov momentum at
0.01 per 256 images, cosine, half an epoch of warmup, stochastic depth 0.1, EMA 0.99, no
RandAugment or MixUp), for EfficientNetV2-S: its BatchNorm momentum (0.9), dropout (0.2) and
eval preprocessing ((x - 128) / 128, bilinear resize of the whole image at 384 px). The
weights come from ``python -m efficientnet.weights`` (timm, Keras or official TF checkpoints;
docs/models.md). For another V2 set ``model.name``, ``data.resolution``,
``data.interpolation`` and ``data.crop_fraction`` to what ``efficientnet.model_info(name)``
lists (e.g. efficientnetv2-b0: 224, bicubic, 0.875). 384 px is costly for a small folder; the
official 21k -> 1k fine-tuning also trains at the eval size, but
``--config.data.resolution=300`` (the V2-S training size) takes 40% less compute.
"""

from configs import base, finetune
from efficientnet import arch

MODEL = 'efficientnetv2-s'


def get_config():
    config = finetune.get_config()
    config.model.name = MODEL
    config.data.resolution = arch.get_variant(MODEL).resolution
    base.apply_variant_preprocessing(config, MODEL)
    return config
