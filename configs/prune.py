"""Magnitude pruning on Fashion-MNIST: fine-tunes a trained quickstart model while tfmot's
polynomial schedule raises the sparsity of every conv and dense kernel from 0 to 75%
(docs/techniques.md). Pass the dense model with --config.init_from, as below.

    python train.py --config=configs/quickstart.py --workdir=/tmp/fmnist_dense \
        --config.data.resolution=32 --config.num_epochs=15
    python train.py --config=configs/prune.py --workdir=/tmp/fmnist_pruned75 \
        --config.init_from=/tmp/fmnist_dense
"""

from configs import quickstart


def get_config():
    config = quickstart.small_config()
    config.num_epochs = 3.0  # 1404 updates at batch 128
    config.optim.base_learning_rate = 0.008  # a fine-tune: a quarter of the quickstart rate
    config.optim.warmup_epochs = 0.0
    config.ema_decay = 0.99
    config.pruning.enabled = True
    config.pruning.initial_sparsity = 0.0
    config.pruning.final_sparsity = 0.75
    config.pruning.begin_step = 0
    config.pruning.end_step = 936  # two epochs of pruning, one at the final sparsity
    config.pruning.frequency = 50
    return config
