"""Experiment configs (ml_collections). ``base.py`` holds the full schema with the official
recipe as defaults; the others change a few fields. Facts about a variant (resolution, dropout,
stochastic depth) come from ``efficientnet.arch`` through ``base.variant_config``, never
restated here. Configs import ml_collections and ``efficientnet.arch`` only."""
