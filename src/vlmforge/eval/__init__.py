"""Evaluation: answer normalisation, metrics and the eval runner."""
