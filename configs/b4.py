"""EfficientNet-B4 on ImageNet: the official recipe at 380 px, dropout 0.4, autoaugment.

Derived values (learning rate, steps) are resolved in training/config_resolve.py.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name = 'efficientnet-b4'
    config.model.dropout_rate = 0.4
    config.data.resolution = 380
    config.data.augment = 'autoaugment'
    return config
