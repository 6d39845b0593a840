"""Model: vision tower, connectors, the VLM that joins them to a causal LM."""
