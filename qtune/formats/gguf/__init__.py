"""GGUF, llama.cpp's file format, split by job as gguf-py is:

- ``layout``: how a ggml tensor's bytes are shaped;
- ``reader``: the one header reader;
- ``writer``: atomic writing with gguf-py's writer;
- ``names``: tensor names, architecture metadata and RoPE layout (from ``qtune.architectures``);
- ``vocab``: the tokenizer as GGUF metadata, and the chat round-trip check;
- ``mixes``: llama.cpp's per-tensor type choice for its quantization mixes;
- ``imatrix``: llama.cpp's importance-matrix files;
- ``convert``: an HF checkpoint as one GGUF file;
- ``lora``: a PEFT adapter as a GGUF LoRA.

The tensor math (ggml's quantizers) is in ``qtune.quant``.
"""
