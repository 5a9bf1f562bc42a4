"""Experiment configs (ml_collections). ``base.py`` holds the full schema with the official
recipe as defaults; the others change a few fields."""
