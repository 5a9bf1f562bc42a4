"""EfficientNet-B5 on ImageNet: the official recipe with RandAugment N=2 M=17."""

from configs import base


def get_config():
    return base.variant_config('efficientnet-b5', augment='randaugment', randaugment_magnitude=17)
