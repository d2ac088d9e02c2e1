"""Training: the jitted step, the loop, checkpoints."""
