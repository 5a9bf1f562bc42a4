"""EfficientNet-B0 on ImageNet in float16 with dynamic loss scaling, for GPUs without bfloat16
(V100, T4): the official recipe otherwise (docs/techniques.md).

    python train.py --config=configs/fp16.py --workdir=/ckpt/b0-fp16
"""

from configs import base


def get_config():
    config = base.variant_config('efficientnet-b0', augment='autoaugment')
    config.model.compute_dtype = 'float16'  # parameters, BatchNorm statistics and loss float32
    config.loss_scale.mode = 'dynamic'  # 2**15, halved and skipped on inf/NaN, x2 per 2000
    return config
