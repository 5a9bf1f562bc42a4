"""EfficientNetV2-XL with the official ImageNet-1k recipe of L (RandAugment, MixUp and CutMix),
and the official code's progressive learning in config.progressive.

The published XL exists only pretrained on ImageNet-21k and fine-tuned on 1k; its 1k-recipe
settings in the official code are L's: 4 stages at 192, 256, 320, 384 px, RandAugment
magnitude 5 -> 20, MixUp and CutMix alpha 0 -> 0.5, dropout 0.4 throughout; eval at 512 px.
The paper's Table 6 has no XL column.
"""

from configs import base


def get_config():
    return base.v2_variant_config(
        'efficientnetv2-xl', augment='randaugment', randaugment_magnitude=20, mixup_alpha=0.5
    )
