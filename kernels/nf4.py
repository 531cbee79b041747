"""bitsandbytes NF4 dequantization: one fused Triton kernel and a pure-torch reference.

Both follow bitsandbytes 0.50 exactly (functional.dequantize_4bit, backends/default/ops.py):
  1. double-quant absmax: a = code2[qabsmax] * absmax2[block // nested_blocksize]  (fp32, rounded),
     then a = a + offset                                                             (fp32, rounded);
  2. value = NF4[nibble] * a[element // blocksize]  (fp32, rounded), cast to the output dtype (RNE).
Two codes per byte, first element in the high nibble. Output is bit-identical to bitsandbytes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from math import prod
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the CPU-only install runs the torch reference
    triton = None
    tl = None
    HAS_TRITON = False

# bitsandbytes' NF4 table (create_normal_map(offset=0.9677083, use_extra_value=True)), exact fp32 values.
NF4_CODE_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 NF4 table on `device` (cached)."""
    device = torch.device(device)
    key = ("code", device)
    if key not in _tables:
        _tables[key] = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)
    return _tables[key]


def _nf4_byte_pairs(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: (NF4[byte >> 4], NF4[byte & 15]) for every byte value, so one gather unpacks a byte."""
    key = ("pairs", device)
    if key not in _tables:
        byte = torch.arange(256, device=device)
        code = nf4_code(device)
        _tables[key] = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()
    return _tables[key]


def _check_quant_state(packed: torch.Tensor, quant_state: Any) -> None:
    if quant_state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 handles quant_type 'nf4' only, got {quant_state.quant_type!r}")
    if quant_state.blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"invalid blocksize {quant_state.blocksize}; bitsandbytes allows {SUPPORTED_BLOCKSIZES}")
    if quant_state.dtype not in OUTPUT_DTYPES:
        raise ValueError(f"NF4 dequant outputs fp16, bf16 or fp32, got {quant_state.dtype}")
    have, need = packed.numel() * packed.element_size(), (prod(quant_state.shape) + 1) // 2
    if have < need:
        raise ValueError(f"packed holds {have} bytes, shape {tuple(quant_state.shape)} needs {need}")


def _blockwise_scale(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] in fp32, one rounding per element (as bitsandbytes does)."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty_like(values)
    torch.mul(values[:full].view(-1, blocksize), scales[: full // blocksize].view(-1, 1), out=out[:full].view(-1, blocksize))
    if full < n:
        torch.mul(values[full:], scales[full // blocksize], out=out[full:])
    return out


def dequantize_absmax_reference(quant_state: Any) -> torch.Tensor:
    """Per-block fp32 absmax; undoes double quantization when the state is nested."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    absmax = torch.index_select(state2.code, 0, quant_state.absmax.int())
    absmax = _blockwise_scale(absmax, state2.absmax.float(), state2.blocksize)
    return absmax + quant_state.offset


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    # quant_storage may be any dtype (bf16 for FSDP, say); the bytes are what count.
    return packed.contiguous().view(torch.uint8).reshape(-1)


def _shape_like_bitsandbytes(flat: torch.Tensor, packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    out = flat.reshape(-1, *shape[1:])
    # bitsandbytes returns the transpose for packed inputs of shape [1, n] (its backward-compat shim).
    return out.t() if packed.shape[0] == 1 else out


def dequantize_nf4_reference(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure torch, bit-identical to bitsandbytes.functional.dequantize_4bit for NF4.

    dtype defaults to quant_state.dtype; passing another one is the same as dequantizing a state
    whose dtype is that (one fp32 -> dtype rounding, never two).
    """
    _check_quant_state(packed, quant_state)
    dtype = dtype or quant_state.dtype
    numel = prod(quant_state.shape)
    data = _as_bytes(packed)
    codes = torch.index_select(_nf4_byte_pairs(data.device), 0, data.int()).view(-1)[:numel]
    values = _blockwise_scale(codes, dequantize_absmax_reference(quant_state), quant_state.blocksize)
    return _shape_like_bitsandbytes(values.to(dtype), packed, quant_state.shape)


if HAS_TRITON:

    @triton.jit
    def _fp32_to_bf16_rtne(x):
        # Round to nearest even in integer arithmetic (exact for finite x). The GPU's own
        # conversion does the same, but Triton's CPU interpreter truncates, so the tested
        # code path and the shipped one are this one.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def nf4_value(code):
        """NF4_CODE_VALUES[code] (fp32) for integer codes 0..15, from constants: a four-level select tree on
        the code's bits, so the table lives in registers and costs no load (as bitsandbytes' CUDA kernel does)."""
        b0 = (code & 1) != 0
        b1 = (code & 2) != 0
        b2 = (code & 4) != 0
        b3 = (code & 8) != 0
        v0 = tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367), tl.where(b0, -0.6961928009986877, -1.0))
        v1 = tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495), tl.where(b0, -0.18477343022823334, -0.28444138169288635))
        v2 = tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634), tl.where(b0, 0.16093020141124725, 0.07958029955625534))
        v3 = tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023), tl.where(b0, 0.5626170039176941, 0.44070982933044434))
        return tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0)).to(tl.float32)

    @triton.jit
    def cast_rtne(x, dtype: tl.constexpr):
        """x.to(dtype) with round-to-nearest-even, also for bf16 under the interpreter."""
        if dtype == tl.bfloat16:
            return _fp32_to_bf16_rtne(x.to(tl.float32))
        else:
            return x.to(dtype)

    @triton.jit
    def _nf4_dequant_kernel(
        packed_ptr,  # uint8 [ceil(numel / 2)]
        absmax_ptr,  # uint8 [n_blocks] if NESTED else fp32 [n_blocks]
        nested_absmax_ptr,  # fp32 [ceil(n_blocks / nested_blocksize)]
        nested_code_ptr,  # fp32 [256]
        offset_ptr,  # fp32 [1]
        out_ptr,
        numel,
        nested_blocksize,
        BLOCKSIZE: tl.constexpr,
        BLOCKS_PER_PROGRAM: tl.constexpr,
        NESTED: tl.constexpr,
    ):
        HALF: tl.constexpr = BLOCKSIZE // 2
        pid = tl.program_id(0).to(tl.int64)
        block = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # [B]
        n_blocks = tl.cdiv(numel, BLOCKSIZE)
        block_mask = block < n_blocks
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=block_mask, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + block // nested_blocksize, mask=block_mask, other=0.0)
            scale = scale + tl.load(offset_ptr)  # no FMA: see NF4_COMPILE_OPTIONS
        else:
            scale = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)

        byte_idx = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [B, HALF]
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (numel + 1) // 2, other=0).to(tl.int32)
        high = nf4_value(byte >> 4) * scale[:, None]
        low = nf4_value(byte & 15) * scale[:, None]
        values = tl.reshape(tl.join(high, low), (BLOCKS_PER_PROGRAM, BLOCKSIZE))  # high nibble first

        out_idx = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + out_idx, cast_rtne(values, out_ptr.dtype.element_ty), mask=out_idx < numel)


# Triton contracts a * b + c into an FMA by default; bitsandbytes rounds the product first.
NF4_COMPILE_OPTIONS = {"enable_fp_fusion": False}


def kernel_launch_options(num_warps: int | None = None) -> dict:
    """Launch options of the NF4 kernels: no FMA contraction (NF4_COMPILE_OPTIONS), none under the interpreter."""
    options = {} if os.environ.get("TRITON_INTERPRET") == "1" else dict(NF4_COMPILE_OPTIONS)
    if num_warps is not None:
        options["num_warps"] = num_warps
    return options


def kernel_scale_args(quant_state: Any, device: torch.device) -> tuple[tuple[torch.Tensor, ...], int]:
    """((absmax, nested_absmax, nested_code, offset), nested_blocksize) as the NF4 kernels take them; when the
    state is not double-quantized, the last three are placeholders the kernels never read."""
    if quant_state.nested:
        state2 = quant_state.state2
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=device).reshape(1)
        scales = (quant_state.absmax.contiguous(), state2.absmax.float().contiguous(), state2.code.float().contiguous(), offset)
        return scales, int(state2.blocksize)
    absmax = quant_state.absmax.float().contiguous()
    return (absmax, absmax, absmax, absmax), 1


def uses_triton(packed: torch.Tensor, backend: str) -> bool:
    """Whether `backend` means the Triton kernels for this weight ("auto": on CUDA, when triton is installed)."""
    return backend == "triton" or (backend == "auto" and packed.is_cuda and HAS_TRITON)


def _blocks_per_program(blocksize: int) -> int:
    return max(1, 2048 // blocksize)


def dequantize_nf4_triton(
    packed: torch.Tensor,
    quant_state: Any,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    blocks_per_program: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """The fused Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    `out`, when given, must be contiguous with quant_state.shape's numel and the wanted dtype.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    _check_quant_state(packed, quant_state)
    dtype = dtype or quant_state.dtype
    numel = prod(quant_state.shape)
    data = _as_bytes(packed)
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=data.device)
    elif out.dtype != dtype or out.numel() != numel or not out.is_contiguous():
        raise ValueError("out must be contiguous, with the state's numel and the requested dtype")
    if numel == 0:
        return _shape_like_bitsandbytes(out.view(-1), packed, quant_state.shape)
    blocksize = quant_state.blocksize
    bpp = blocks_per_program or _blocks_per_program(blocksize)
    n_blocks = -(-numel // blocksize)
    scales, nested_blocksize = kernel_scale_args(quant_state, data.device)
    _nf4_dequant_kernel[(triton.cdiv(n_blocks, bpp),)](
        data,
        *scales,
        out,
        numel,
        nested_blocksize,
        BLOCKSIZE=blocksize,
        BLOCKS_PER_PROGRAM=bpp,
        NESTED=bool(quant_state.nested),
        **kernel_launch_options(num_warps),
    )
    return _shape_like_bitsandbytes(out.view(-1), packed, quant_state.shape)


@functools.cache
def _bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _dequantize_with_bitsandbytes(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype | None) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    _check_quant_state(packed, quant_state)
    state2 = None
    if quant_state.nested:
        s2 = quant_state.state2
        state2 = bnb_functional.QuantState(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, dtype=torch.float32)
    state = bnb_functional.QuantState(
        absmax=quant_state.absmax, shape=quant_state.shape, blocksize=quant_state.blocksize, quant_type="nf4",
        dtype=dtype or quant_state.dtype, offset=quant_state.offset, state2=state2,
    )  # fmt: skip
    out = bnb_functional.dequantize_4bit(packed, state)
    if len(quant_state.shape) == 1:
        out = out.reshape(quant_state.shape)  # bitsandbytes' CPU op returns [1, n] for 1-D shapes
    return out


def dequantize_nf4(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """Dequantize a bitsandbytes NF4 weight, bit-identical to bitsandbytes.functional.dequantize_4bit.

    backend: "auto" (Triton on CUDA when triton is installed; elsewhere bitsandbytes' own op when it
    is installed, as on CPU it is several times faster than the torch reference; else the torch
    reference), "triton", "torch" or "bitsandbytes". quant_state may be a bitsandbytes QuantState or
    anything with its attributes (absmax, shape, dtype, blocksize, quant_type, nested, offset, state2).
    """
    if backend == "auto":
        if uses_triton(packed, backend):
            backend = "triton"
        elif _bitsandbytes_available():
            backend = "bitsandbytes"
        else:
            backend = "torch"
    if backend == "bitsandbytes":
        return _dequantize_with_bitsandbytes(packed, quant_state, dtype)
    if backend == "triton":
        return dequantize_nf4_triton(packed, quant_state, dtype)
    if backend == "torch":
        return dequantize_nf4_reference(packed, quant_state, dtype)
    raise ValueError(f"backend must be 'auto', 'triton', 'torch' or 'bitsandbytes', got {backend!r}")
