"""Models in and out: `vlmforge export` to transformers' LLaVA format (what vLLM and TGI serve),
llama.cpp's GGUF or vlmforge's own, each with a model card; `vlmforge import` of LLaVA checkpoints.

`formats.py` picks the format and writes the folder; `llava.py` maps a model onto
`LlavaForConditionalGeneration` and back; `gguf.py` writes llama.cpp's two files; `card.py` the
model card."""

from vlmforge.export.card import model_card
from vlmforge.export.errors import ExportError
from vlmforge.export.formats import FORMATS, export
from vlmforge.export.llava import import_llava, llava_obstacles, processor_chat_template, to_llava

__all__ = [
    "FORMATS",
    "ExportError",
    "export",
    "import_llava",
    "llava_obstacles",
    "model_card",
    "processor_chat_template",
    "to_llava",
]
