"""Optimiser, training loop, evaluation, checkpoints and run logs."""
