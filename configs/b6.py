"""EfficientNet-B6 on ImageNet: the official recipe at 528 px, dropout 0.5, autoaugment.

Derived values (learning rate, steps) are resolved in training/config_resolve.py.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name = 'efficientnet-b6'
    config.model.dropout_rate = 0.5
    config.data.resolution = 528
    config.data.augment = 'autoaugment'
    return config
