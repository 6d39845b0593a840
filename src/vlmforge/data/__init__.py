"""Data: LLaVA-format records, image loading and processing, prompts and label masks, batching."""
