"""Dense weights of a compressed-tensors checkpoint as transformers and the compressed-tensors package
decompress them: the independent reader for qtune's compressed-tensors exports.

Runs in vLLM's own venv (``scripts/build_oracles.sh`` builds ``.cache/vllm-venv``, which has transformers
and compressed-tensors), never in qtune's; it imports nothing from qtune.

    .cache/vllm-venv/bin/python scripts/ct_dequantize.py MODEL_DIR OUT.safetensors [MODEL_DIR OUT.safetensors ...]

Each OUT.safetensors gets its model's every decoder linear's ``.weight`` in the dtype transformers loads
it in (several models in one process: transformers is imported once).
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    pairs = sys.argv[1:]
    if not pairs or len(pairs) % 2:
        print("usage: ct_dequantize.py MODEL_DIR OUT.safetensors [MODEL_DIR OUT.safetensors ...]", file=sys.stderr)
        return 2
    from safetensors.torch import save_file
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    for model_dir, out in zip(pairs[::2], pairs[1::2]):
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=CompressedTensorsConfig(run_compressed=False))
        linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"]
        weights = {f"{name}.weight": module.weight.detach().contiguous() for name, module in linears}
        save_file(weights, out + ".tmp")
        os.replace(out + ".tmp", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
