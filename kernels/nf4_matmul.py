"""Matmuls with a bitsandbytes NF4 weight dequantized tile by tile inside the GEMM: no [out, in] weight is
ever written to memory, in the forward or in the backward.

    nf4_linear(x, W)      = x @ dequant(W)^T     x [M, K] -> [M, N]   (the layer's forward)
    nf4_linear_grad(g, W) = g @ dequant(W)       g [M, N] -> [M, K]   (its input gradient)

W is [N, K] as bitsandbytes stores it: the flattened weight in blocks of `blocksize` values, one absmax
each (double-quantized or not), two codes a byte, high nibble first. Each tile's values are computed as
bitsandbytes computes them (NF4[code] * absmax in float32, one rounding, then the compute dtype; the
absmax's own double quantization without a fused multiply-add), so the products are those of
F.linear(x, dequantize_4bit(W)); only the order of the float32 accumulation differs. The kernels need
K to be a multiple of the block size, so that no quantization block straddles two rows (every real
model's widths are); `supports` says when they apply.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .nf4 import HAS_TRITON, SUPPORTED_BLOCKSIZES, _as_bytes, kernel_launch_options, kernel_scale_args

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .nf4 import cast_rtne, nf4_value

    @triton.jit
    def _nf4_tile(
        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
        offs_n, k0, N, K, nested_blocksize,
        BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr,
    ):  # fmt: skip
        """W[offs_n, k0:k0 + BLOCK_K] as [BLOCK_N, BLOCK_K] in DTYPE, each value rounded as bitsandbytes rounds it."""
        offs_half = k0 // 2 + tl.arange(0, BLOCK_K // 2).to(tl.int64)  # byte j holds columns 2j (high) and 2j + 1
        mask = (offs_n < N)[:, None] & (offs_half < K // 2)[None, :]
        byte = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + offs_half[None, :], mask=mask, other=0).to(tl.int32)
        block = offs_n[:, None] * (K // BLOCKSIZE) + (2 * offs_half // BLOCKSIZE)[None, :]
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + block // nested_blocksize, mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)  # no FMA: NF4_COMPILE_OPTIONS
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        high = nf4_value(byte >> 4) * scale
        low = nf4_value(byte & 15) * scale
        return cast_rtne(tl.reshape(tl.join(high, low), (BLOCK_N, BLOCK_K)), DTYPE)

    @triton.jit
    def _nf4_linear_kernel(
        x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
        M, N, K, stride_xm, stride_om, nested_blocksize,
        BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
            w = _nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                          offs_n, k0, N, K, nested_blocksize, BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K, x_ptr.dtype.element_ty)  # fmt: skip
            if DOT_IN_FP32:
                acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(w), acc)
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, cast_rtne(acc, out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])

    @triton.jit
    def _nf4_linear_grad_kernel(
        g_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
        M, N, K, stride_gm, stride_om, nested_blocksize,
        BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            gt = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], mask=(offs_m < M)[:, None] & (offs_n < N)[None, :], other=0.0)
            w = _nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                          offs_n, k0, N, K, nested_blocksize, BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K, g_ptr.dtype.element_ty)  # fmt: skip
            if DOT_IN_FP32:
                acc = tl.dot(gt.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(gt, w, acc)
        out = out_ptr + offs_m[:, None] * stride_om + offs_k[None, :]
        tl.store(out, cast_rtne(acc, out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


def supports(blocksize: int, in_features: int) -> bool:
    """Whether the fused matmuls take an NF4 weight of `in_features` columns: no quantization block may
    straddle two rows."""
    return HAS_TRITON and blocksize in SUPPORTED_BLOCKSIZES and in_features % blocksize == 0


def _blocks(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps) by the number of rows; not yet tuned on a GPU (docs/benchmarks.md)."""
    if m <= 16:
        return 16, 64, 64, 4
    if m <= 64:
        return 64, 64, 64, 4
    return 128, 128, 64, 8  # training's token counts: the tiles Triton's own matmul tutorial uses on Hopper


def _nf4_gemm(x: torch.Tensor, packed: torch.Tensor, quant_state: Any, transposed: bool) -> torch.Tensor:
    n, k = (int(d) for d in quant_state.shape)
    inner, outer = (n, k) if transposed else (k, n)
    x2 = x.reshape(-1, inner)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, outer, dtype=x.dtype, device=x.device)
    scales, nested_blocksize = kernel_scale_args(quant_state, x.device)
    block_m, block_n, block_k, warps = _blocks(m)
    kernel, block_outer = (_nf4_linear_grad_kernel, block_k) if transposed else (_nf4_linear_kernel, block_n)
    kernel[(triton.cdiv(m, block_m), triton.cdiv(outer, block_outer))](
        x2, _as_bytes(packed), *scales, out, m, n, k, x2.stride(0), out.stride(0), nested_blocksize,
        BLOCKSIZE=quant_state.blocksize, NESTED=bool(quant_state.nested),
        DOT_IN_FP32=os.environ.get("TRITON_INTERPRET") == "1" or x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **kernel_launch_options(warps),
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], outer)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """x [..., K] @ dequant(W)^T -> [..., N] in x's dtype (W [N, K]), x in the dtype to compute in."""
    return _nf4_gemm(x, packed, quant_state, transposed=False)


def nf4_linear_grad(g: torch.Tensor, packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """g [..., N] @ dequant(W) -> [..., K] in g's dtype (W [N, K]): the input gradient of nf4_linear."""
    return _nf4_gemm(g, packed, quant_state, transposed=True)
