"""Training: the short loop, checkpoints, run folders."""
