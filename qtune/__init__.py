"""qtune: QLoRA fine-tuning on quantized bases, exported to GGUF, GPTQ and AWQ."""

__version__ = "0.1.0"
