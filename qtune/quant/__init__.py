"""Quantization math: pure functions from tensors to tensors, with no file formats."""

from dataclasses import dataclass

# GPTQ's and AWQ's settings when none are given: the recipe's export targets, the CLI and the math below.
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 128
DEFAULT_DAMP = 0.01  # GPTQ's damping, a fraction of the Hessian's mean diagonal


@dataclass(frozen=True)
class CtScheme:
    """A compressed-tensors scheme qtune writes: its weights, and the activations the runtime rounds."""

    weight_bits: int
    weight_type: str  # "int" or "float"
    per_channel: bool  # one scale per output channel (no group_size)
    activations: str | None  # None (16-bit), or dynamic per-token "int8" / "fp8"
    smoothing: float  # SmoothQuant's default strength (0: none)


CT_SCHEMES = {
    "W4A16": CtScheme(4, "int", per_channel=False, activations=None, smoothing=0.0),  # GPTQ's rounding, grouped
    "W8A8": CtScheme(8, "int", per_channel=True, activations="int8", smoothing=0.5),  # SmoothQuant, then GPTQ
    "FP8": CtScheme(8, "float", per_channel=True, activations="fp8", smoothing=0.0),  # E4M3, rounded by GPTQ
}
