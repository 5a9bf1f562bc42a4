"""With and without progressive learning: ``progressive.stages`` 1 (every step at the final
size) and 4, on any config that sets up ``config.progressive`` (configs/v2_fashion.py).

    python scripts/sweep.py --config=configs/v2_fashion.py \
        --sweep=configs/sweeps/progressive.py --workdir=/tmp/v2_fashion
"""

from configs.sweeps import grid


def get_sweep() -> list[dict]:
    return grid({'progressive.stages': [4, 1]})
