"""EfficientNet-B7 on ImageNet: the official recipe at 600 px, dropout 0.5, RandAugment N=2 M=28.

Derived values (learning rate, steps) are resolved in training/config_resolve.py.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name = 'efficientnet-b7'
    config.model.dropout_rate = 0.5
    config.data.resolution = 600
    config.data.augment = 'randaugment'
    config.data.randaugment_magnitude = 28
    return config
