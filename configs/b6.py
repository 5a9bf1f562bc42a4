"""EfficientNet-B6 on ImageNet: the official recipe with AutoAugment."""

from configs import base


def get_config():
    return base.variant_config('efficientnet-b6', augment='autoaugment')
