"""EfficientNetV2-M on ImageNet: the official recipe with RandAugment, MixUp and CutMix, and
the official code's progressive learning in config.progressive.

The official code (google/automl efficientnetv2): 4 stages at 192, 256, 320, 384 px,
RandAugment magnitude 5 -> 15, MixUp and CutMix alpha 0 -> 0.2, dropout 0.3 throughout; eval
at 480 px. The paper's Table 6 (min -> max): size 128 -> 380, RandAugment 5 -> 20,
MixUp 0 -> 0.2, dropout 0.1 -> 0.4.
"""

from configs import base


def get_config():
    return base.v2_variant_config(
        'efficientnetv2-m', augment='randaugment', randaugment_magnitude=15, mixup_alpha=0.2
    )
