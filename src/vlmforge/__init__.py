"""vlmforge: build a vision-language model from a frozen vision encoder and an open LLM.

The package does no work at import time; heavy libraries (torch, transformers) are imported by
the modules that need them.
"""

__version__ = "0.1.0"
