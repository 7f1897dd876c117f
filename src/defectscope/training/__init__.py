"""Training: losses, sampling, augmentation and the training loop that writes a run directory."""
