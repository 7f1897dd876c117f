"""Models: one factory over timm architectures and the die-bridge project's seed CNNs."""
