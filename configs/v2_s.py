"""EfficientNetV2-S on ImageNet: the official recipe with RandAugment and the official code's
progressive learning in config.progressive.

The official code (google/automl efficientnetv2): 4 stages at 171, 214, 257, 300 px,
RandAugment magnitude 5 -> 10, no MixUp/CutMix, dropout 0.2 throughout; eval at 384 px.
The paper's Table 6 (min -> max): size 128 -> 300, RandAugment 5 -> 15, MixUp 0 -> 0,
dropout 0.1 -> 0.3 (stages 128/185/243/300 by its Algorithm 1; config.progressive.rule='paper'
with those bounds reproduces it).
"""

from configs import base


def get_config():
    return base.v2_variant_config(
        'efficientnetv2-s', augment='randaugment', randaugment_magnitude=10, mixup_alpha=0.0
    )
