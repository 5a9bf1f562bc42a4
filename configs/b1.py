"""EfficientNet-B1 on ImageNet: the official recipe with AutoAugment."""

from configs import base


def get_config():
    return base.variant_config('efficientnet-b1', augment='autoaugment')
