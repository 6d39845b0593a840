"""Inference front-ends over the model's generation."""
