"""Training: plain functions for the loop, optimizers and checkpoints (no god class)."""
