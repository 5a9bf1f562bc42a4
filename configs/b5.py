"""EfficientNet-B5 on ImageNet: the official recipe at 456 px, dropout 0.4, RandAugment N=2 M=17.

Derived values (learning rate, steps) are resolved in training/config_resolve.py.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name = 'efficientnet-b5'
    config.model.dropout_rate = 0.4
    config.data.resolution = 456
    config.data.augment = 'randaugment'
    config.data.randaugment_magnitude = 17
    return config
