"""Converters from other frameworks' weights to basic checkpoints (`python -m basic.convert.X`)."""
