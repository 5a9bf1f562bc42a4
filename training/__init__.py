"""Training pieces for EfficientNet: optimizer and schedule, losses, metrics, EMA, train state,
mesh and sharding rules, checkpoints and the jitted steps. Pure functions; ``train.py`` wires
them into a run."""
