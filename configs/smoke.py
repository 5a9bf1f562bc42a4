"""A few steps on fake data with a tiny model (width = depth = 0.25, 32 px), for tests."""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name = 'efficientnet-b0'
    config.model.width = 0.25
    config.model.depth = 0.25
    config.model.compute_dtype = 'float32'
    config.model.depthwise_impl = 'xla'  # a smaller program than 'unrolled': compiles faster
    config.model.bn_group_size = 8
    config.data.name = 'fake'
    config.data.num_classes = 10
    config.data.resolution = 32
    config.data.fake_num_train = 64
    config.data.fake_num_eval = 40  # not a multiple of the batch: exercises the eval mask
    config.batch_size = 16
    config.num_epochs = 2.0  # 4 steps per epoch, 8 steps
    config.optim.warmup_epochs = 0.5
    config.optim.decay_epochs = 0.5
    config.ema_decay = 0.99
    config.log_every_steps = 2
    config.eval_every_epochs = 1.0
    config.checkpoint.every_steps = 4
    config.checkpoint.keep = 2
    return config
