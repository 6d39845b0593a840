"""Training: stages (what trains), the loop, checkpoints."""
