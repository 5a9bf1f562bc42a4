"""Random search on configs/smoke.py: 6 draws of learning rate (log-uniform), label smoothing
(uniform) and EMA decay (a choice). The seed fixes the draws, so re-running the sweep names the
same runs and skips the finished ones.

    python scripts/sweep.py --config=configs/smoke.py --sweep=configs/sweeps/smoke_random.py \
        --workdir=/tmp/smoke_random
"""

from configs.sweeps import log_uniform, random_search, uniform


def get_sweep() -> list[dict]:
    space = {
        'optim.base_learning_rate': log_uniform(0.004, 0.256),
        'label_smoothing': uniform(0.0, 0.2),
        'ema_decay': [0.9, 0.99],
    }
    return random_search(space, num_trials=6, seed=0)
