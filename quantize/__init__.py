"""quantize: one fp16 Hugging Face model in, a complete GPTQ / AWQ / GGUF release out."""

from .errors import BadInput, QuantizeError, WorkFailed

__version__ = "0.1.0"
__all__ = ["BadInput", "QuantizeError", "WorkFailed", "__version__"]
