"""Training: train state, the jitted train step, optimizer, Orbax checkpoints, and the training loop."""
