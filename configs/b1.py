"""EfficientNet-B1 on ImageNet: the official recipe at 240 px, dropout 0.2, autoaugment.

Derived values (learning rate, steps) are resolved in training/config_resolve.py.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name = 'efficientnet-b1'
    config.model.dropout_rate = 0.2
    config.data.resolution = 240
    config.data.augment = 'autoaugment'
    return config
