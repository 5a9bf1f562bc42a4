"""EfficientNet-B3 on ImageNet: the official recipe with AutoAugment."""

from configs import base


def get_config():
    return base.variant_config('efficientnet-b3', augment='autoaugment')
