"""EfficientNetV2-L on ImageNet: the official recipe with RandAugment, MixUp and CutMix, and
the official code's progressive learning in config.progressive.

The official code (google/automl efficientnetv2): 4 stages at 192, 256, 320, 384 px,
RandAugment magnitude 5 -> 20, MixUp and CutMix alpha 0 -> 0.5, dropout 0.4 throughout; eval
at 480 px. The paper's Table 6 (min -> max): size 128 -> 380, RandAugment 5 -> 25,
MixUp 0 -> 0.4, dropout 0.1 -> 0.5.
"""

from configs import base


def get_config():
    return base.v2_variant_config(
        'efficientnetv2-l', augment='randaugment', randaugment_magnitude=20, mixup_alpha=0.5
    )
