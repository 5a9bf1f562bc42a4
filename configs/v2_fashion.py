"""Progressive learning measured on Fashion-MNIST: a narrow EfficientNetV2-B0 (width = depth =
0.5) with the data and schedule of configs/quickstart.py's small_config(), 6 epochs, evaluated
every epoch at 32 px, trained in 4 stages at 20, 24, 28 and 32 px (the official rule from
16 px). ``--config.progressive.stages=1`` trains every step at 32 px: the same run without
progressive learning.

    python scripts/sweep.py --config=configs/v2_fashion.py \
        --sweep=configs/sweeps/progressive.py --workdir=/tmp/v2_fashion
    python scripts/sweep_report.py /tmp/v2_fashion

The quickstart's augmentation is a horizontal flip only, so the stages change the image size
alone (docs/models.md has the measured times and accuracies).
"""

from configs import quickstart


def get_config():
    config = quickstart.small_config()
    config.model.name = 'efficientnetv2-b0'
    config.model.width = 0.5
    config.model.depth = 0.5
    config.num_epochs = 6.0
    config.eval_every_epochs = 1.0
    p = config.progressive
    p.stages = 4
    p.rule = 'official'
    p.min_resolution = 16
    p.max_resolution = 32
    return config
