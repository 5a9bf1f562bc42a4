"""The fine-tuning learning rate, the setting transfer results depend on most (Kornblith et al.
2019 pick it per dataset): four values a factor ~3 apart around configs/finetune.py's 0.01.

    python scripts/sweep.py --config=configs/finetune.py --sweep=configs/sweeps/finetune_lr.py \
        --workdir=/ckpt/ft_lr --config.init_from=b0.msgpack --config.data.folder=/data/flowers \
        --config.data.num_classes=5
"""

from configs.sweeps import grid


def get_sweep() -> list[dict]:
    return grid({'optim.base_learning_rate': [0.003, 0.01, 0.03, 0.1]})
