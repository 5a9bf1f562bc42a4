"""DropBlock on Fashion-MNIST (docs/techniques.md).

    python train.py --config=configs/dropblock.py --workdir=/tmp/fmnist_dropblock

At the quickstart's 32 px the last two stages' feature maps are 1x1, where DropBlock drops
whole channels; this example puts it on the two stages before them instead (stages 4 and 5
of 7, 2x2 maps) with 2x2 blocks, both at keep_prob 0.9 (scale_by_stage False: the official
rule would scale the drop rate of stage 5 by 1/4 and of stage 4 by 1/16, relative to the
network's last stage). On ImageNet-sized inputs the default, the last two stages with 7x7
blocks and the official per-stage rule, is the usual choice.
"""

from configs import quickstart


def get_config():
    config = quickstart.small_config()
    config.dropblock.keep_prob = 0.9  # reached at the last step, from 1.0 at step 0
    config.dropblock.block_size = 2
    config.dropblock.stages = (-4, -3)
    config.dropblock.scale_by_stage = False
    return config
