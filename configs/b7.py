"""EfficientNet-B7 on ImageNet: the official recipe with RandAugment N=2 M=28."""

from configs import base


def get_config():
    return base.variant_config('efficientnet-b7', augment='randaugment', randaugment_magnitude=28)
