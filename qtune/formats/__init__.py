"""File formats: tensors to bytes and names (GGUF, GPTQ, AWQ), with no quantization math."""
