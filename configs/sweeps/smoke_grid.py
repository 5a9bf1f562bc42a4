"""A 2 x 2 grid on configs/smoke.py: base learning rate x label smoothing.

    python scripts/sweep.py --config=configs/smoke.py --sweep=configs/sweeps/smoke_grid.py \
        --workdir=/tmp/smoke_grid
    python scripts/sweep_report.py /tmp/smoke_grid
"""

from configs.sweeps import grid


def get_sweep() -> list[dict]:
    return grid({'optim.base_learning_rate': [0.016, 0.064], 'label_smoothing': [0.0, 0.1]})
