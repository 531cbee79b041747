"""GGUF tensor quantization: float32 rows -> the exact bytes ggml stores, and back.

``quantize`` reproduces ``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix)`` of
ggml 0.25.3 (the llama.cpp bundled with llama-cpp-python 0.3.36) byte for byte, with or without an
importance matrix, for F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
IQ4_NL and IQ4_XS.
Two encoders give the same bytes. On the CPU, ``ggml_cpu``'s compiled ports of the C loops run (faster
than ggml's own quantizer on the k-quants). On other devices (or with ``QTUNE_GGML_ENCODER=torch``) the vectorized torch
encoders run; they keep the float32 operation order of the C code (see ``ggml_search``), so CUDA
gives the CPU's bytes.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from gguf import GGMLQuantizationType

from qtune.quant.ggml_search import div, seqsum, sqrt
from qtune.quant.ggml_types import GGML_TYPES, ggml_type

Q = GGMLQuantizationType

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(GGML_TYPES)

# Rows are quantized in chunks of about this many values (a few dozen float32 temporaries of a
# chunk are alive at once). GPUs get bigger chunks: there the cost is per kernel launch.
CHUNK_VALUES = 1 << 17
CHUNK_VALUES_GPU = 1 << 22


def block_size(qtype: GGMLQuantizationType) -> int:
    """Values per block (1 for the float types)."""
    return ggml_type(qtype).block_size


def type_size(qtype: GGMLQuantizationType) -> int:
    """Bytes per block."""
    return ggml_type(qtype).type_size


def row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes of one quantized row of ``n_per_row`` values (ggml_row_size)."""
    _check_row_length(qtype, n_per_row)
    return n_per_row // block_size(qtype) * type_size(qtype)


def quantize(x: torch.Tensor, qtype: GGMLQuantizationType, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize rows ``x`` [rows, n_per_row] to ggml ``qtype``: uint8 [rows, row_bytes].

    ``imatrix`` is the per-column importance vector [n_per_row] (llama.cpp's imatrix entry for this
    tensor). As in ggml it is ignored by F32/F16/BF16/Q8_0 and switches the other types to their
    importance-weighted search.
    """
    entry = ggml_type(qtype)
    qtype = entry.qtype
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize expects a 2-D float tensor [rows, n_per_row], got {tuple(x.shape)} {x.dtype}")
    rows, n_per_row = x.shape
    _check_row_length(qtype, n_per_row)
    x = x.to(torch.float32).contiguous()
    if imatrix is not None:
        if imatrix.shape != (n_per_row,):
            raise ValueError(f"imatrix must have shape ({n_per_row},), got {tuple(imatrix.shape)}")
        imatrix = imatrix.to(device=x.device, dtype=torch.float32).contiguous()

    if qtype == Q.F32:
        return x.view(torch.uint8).reshape(rows, n_per_row * 4).clone()
    if qtype == Q.F16:
        return _to_f16_bits(x).view(torch.uint8).reshape(rows, n_per_row * 2)
    if qtype == Q.BF16:
        return _to_bf16_bits(x).view(torch.uint8).reshape(rows, n_per_row * 2)

    out = torch.empty(rows, row_bytes(qtype, n_per_row), dtype=torch.uint8, device=x.device)
    if rows == 0:
        return out
    if _use_compiled_encoder(x):
        from qtune.quant import ggml_cpu

        threads = torch.get_num_threads()
        try:
            qw = None if imatrix is None else imatrix.detach().numpy()
            ggml_cpu.quantize_rows(x.detach().numpy(), qtype, qw, out.numpy(), threads)
        finally:
            # numba's OpenMP pool can reset the process-wide OpenMP thread count that torch reads
            torch.set_num_threads(threads)
        return out
    bs = entry.block_size
    weighted = imatrix is not None and entry.uses_imatrix
    legacy_sigma2 = None
    if weighted and entry.family == "legacy":
        # quantize_row_q4_0_impl & co: sigma2 is the mean square over the whole row
        legacy_sigma2 = div(seqsum(x * x), float(n_per_row))
    step = max(1, (CHUNK_VALUES if x.device.type == "cpu" else CHUNK_VALUES_GPU) // n_per_row)
    for r0 in range(0, rows, step):
        xc = x[r0 : r0 + step]
        nr = xc.shape[0]
        blocks = xc.reshape(-1, bs)
        if entry.family in ("k-quant", "i-quant"):
            qw = imatrix.expand(nr, n_per_row).reshape(-1, bs) if weighted else None
            data = entry.encode(blocks, qw)
        elif weighted:
            sigma2 = legacy_sigma2[r0 : r0 + nr].view(nr, 1, 1)
            xb = xc.view(nr, -1, bs)
            weights = (imatrix.view(1, -1, bs) * sqrt(sigma2 + xb * xb)).reshape(-1, bs)
            data = entry.encode_weighted(blocks, weights)
        else:
            data = entry.encode(blocks)
        out[r0 : r0 + nr] = data.to(torch.uint8).view(nr, -1)
    return out


def dequantize(data: torch.Tensor, qtype: GGMLQuantizationType, n_per_row: int) -> torch.Tensor:
    """Decode ggml ``qtype`` rows (uint8 [rows, row_bytes]) to float32 [rows, n_per_row]."""
    entry = ggml_type(qtype)
    qtype = entry.qtype
    nbytes = row_bytes(qtype, n_per_row)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != nbytes:
        raise ValueError(f"{qtype.name} rows of {n_per_row} values need uint8 data [rows, {nbytes}], got {data.dtype} {tuple(data.shape)}")
    rows = data.shape[0]
    data = data.contiguous()
    if qtype == Q.F32:
        return data.view(torch.float32).clone()
    if qtype == Q.F16:
        return data.view(torch.float16).to(torch.float32)
    if qtype == Q.BF16:
        return data.view(torch.bfloat16).to(torch.float32)
    blocks = data.view(-1, entry.type_size).to(torch.int32)
    return entry.decode(blocks).reshape(rows, n_per_row)


def _use_compiled_encoder(x: torch.Tensor) -> bool:
    choice = os.environ.get("QTUNE_GGML_ENCODER", "compiled")
    if choice not in ("compiled", "torch"):
        raise ValueError(f"QTUNE_GGML_ENCODER must be 'compiled' or 'torch', got {choice!r}")
    # numba is a dependency, but the torch encoders keep working where it cannot be installed
    return choice == "compiled" and x.device.type == "cpu" and importlib.util.find_spec("numba") is not None


def _check_row_length(qtype: GGMLQuantizationType, n_per_row: int) -> None:
    bs = ggml_type(qtype).block_size
    if n_per_row <= 0 or n_per_row % bs != 0:
        raise ValueError(f"{qtype.name} stores blocks of {bs} values: n_per_row={n_per_row} is not a multiple of {bs}")


def _to_f16_bits(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16: round to nearest even; NaN becomes 0x7E00 with the sign kept."""
    bits = x.to(torch.float16).view(torch.int16)
    nan_bits = torch.where(x.view(torch.int32) < 0, -0x8000 | 0x7E00, 0x7E00).to(torch.int16)
    return torch.where(torch.isnan(x), nan_bits, bits)


def _to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16: round to nearest even on the bits; NaN is forced quiet."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    quiet_nan = (u >> 16) | 64
    bits = torch.where((u & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded) & 0xFFFF
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
