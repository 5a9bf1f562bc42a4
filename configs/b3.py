"""EfficientNet-B3 on ImageNet: the official recipe at 300 px, dropout 0.3, autoaugment.

Derived values (learning rate, steps) are resolved in training/config_resolve.py.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name = 'efficientnet-b3'
    config.model.dropout_rate = 0.3
    config.data.resolution = 300
    config.data.augment = 'autoaugment'
    return config
