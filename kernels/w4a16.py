"""4-bit weight, 16-bit activation matmul for GPTQ and AWQ checkpoints: a Triton kernel and a torch reference.

Layouts (K = in_features, N = out_features, G = number of groups):
  "gptq"    qweight int32 [K/8, N] packed along K, LSB nibble first; qzeros int32 [G, N/8] packed along N,
            LSB first; scales [G, N]; g_idx [K] (or k // group_size). v1 checkpoints store zero - 1.
  "gptq_v2" the same with raw zeros.
  "awq"     qweight int32 [K, N/8] packed along N with nibble order [0,2,4,6,1,3,5,7]; qzeros [G, N/8]
            with the same interleave, raw zeros; scales [G, N]; group = k // group_size.
Dequant: W[k, n] = scales[g, n] * (q[k, n] - zero[g, n]), rounded to the scales' dtype (as the
reference checkpoints' torch kernels do), then y = x @ W (+ bias) with fp32 accumulation.
"""

from __future__ import annotations

import functools
import os

import torch

from qtune.formats.awq import AWQ_ORDER  # nibble i of a word holds column 8c + AWQ_ORDER[i]

from .nf4 import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .nf4 import cast_rtne

LAYOUTS = ("gptq", "gptq_v2", "awq")
_LAYOUT_ID = {"gptq": 0, "gptq_v2": 1, "awq": 2}
AWQ_NIBBLE_OF_COLUMN = tuple(AWQ_ORDER.index(j) for j in range(8))  # column 8c + j sits in nibble AWQ_NIBBLE_OF_COLUMN[j]


def _shapes(qweight: torch.Tensor, scales: torch.Tensor, layout: str) -> tuple[int, int]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32, got {qweight.dtype}")
    if layout == "awq":
        return qweight.shape[0], qweight.shape[1] * 8
    return qweight.shape[0] * 8, qweight.shape[1]


def group_index(in_features: int, n_groups: int, layout: str, g_idx: torch.Tensor | None, group_size: int | None) -> torch.Tensor:
    """int32 [K]: the group of each input channel."""
    if g_idx is not None:
        if layout == "awq":
            raise ValueError("AWQ has no g_idx")
        return g_idx.to(torch.int32)
    group_size = checked_group_size(in_features, n_groups, layout, group_size)
    return torch.div(torch.arange(in_features, dtype=torch.int32), group_size, rounding_mode="floor")


def checked_group_size(in_features: int, n_groups: int, layout: str, group_size: int | None) -> int:
    """The group size of a weight without g_idx (AWQ's from its scales), checked against the number of groups."""
    if group_size is None:
        if layout != "awq":
            # ceil(K / G) is ambiguous for GPTQ when G does not divide K; the checkpoint's g_idx or config says.
            raise ValueError("GPTQ without g_idx needs group_size")
        group_size = in_features // n_groups
    if -(-in_features // group_size) != n_groups:
        raise ValueError(f"group_size {group_size} gives {-(-in_features // group_size)} groups, scales has {n_groups}")
    return group_size


def unpack_w4a16_reference(qweight: torch.Tensor, qzeros: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [K, N] int32 in 0..15, zeros [G, N] int32 as used in the dequant, v1's +1 applied)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    if layout == "awq":
        order = torch.tensor(AWQ_NIBBLE_OF_COLUMN, device=qweight.device)
        shifts = shifts[order]
        codes = ((qweight[:, :, None] >> shifts) & 15).reshape(qweight.shape[0], -1)
    else:
        codes = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, qweight.shape[1])
    zeros = ((qzeros[:, :, None] >> shifts) & 15).reshape(qzeros.shape[0], -1)
    if layout == "gptq":
        zeros = zeros + 1  # v1 stores zero - 1; add it back per nibble, as the v1 kernels do
    return codes, zeros


def dequantize_w4a16_reference(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    layout: str,
    group_size: int | None = None,
) -> torch.Tensor:
    """W [K, N] in scales' dtype: scales[g] * (q - zero[g]), one rounding."""
    in_features, _ = _shapes(qweight, scales, layout)
    groups = group_index(in_features, scales.shape[0], layout, g_idx, group_size).long().to(qweight.device)
    codes, zeros = unpack_w4a16_reference(qweight, qzeros, layout)
    diff = (codes - zeros[groups]).float()
    return (diff * scales[groups].float()).to(scales.dtype)  # exact fp32 product, rounded once


def w4a16_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    layout: str,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequant(W) [K, N] (+ bias), computed in fp32 and returned in x.dtype."""
    weight = dequantize_w4a16_reference(qweight, qzeros, scales, g_idx, layout, group_size).to(x.dtype)
    y = x.float() @ weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _w4a16_kernel(
        x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, groups_ptr, bias_ptr, out_ptr,
        M, N, K, group_size,
        stride_xm, stride_om,
        LAYOUT: tl.constexpr,  # 0 gptq (v1), 1 gptq_v2, 2 awq
        ALIGNED_GROUPS: tl.constexpr,  # group = k // group_size and BLOCK_K divides group_size
        HAS_G_IDX: tl.constexpr,  # groups_ptr holds each input channel's group; else k // group_size
        HAS_BIAS: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # only under the interpreter, whose dot misreads bf16
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,  # >1: program (m, n, s) sums K-slice s into out_ptr[s] (fp32 partials)
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        # int64 offsets: M x N outputs, K x N/8 words and the like pass 2^31 on large layers and batches
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        n_packed = N // 8
        eighth = tl.arange(0, 8)
        if LAYOUT == 2:
            nibble = (offs_n % 8) // 2 + 4 * (offs_n % 2)  # AWQ interleave: column 8c + j in nibble [0,4,1,5,2,6,3,7][j]
            word_shifts = 4 * (eighth // 2 + 4 * (eighth % 2))
        else:
            nibble = offs_n % 8
            word_shifts = 4 * eighth
        offs_words_n = pid_n.to(tl.int64) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # whole tiles per slice
        k_start = pid_k * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < K
            # each packed word is loaded once and expanded to its 8 codes
            if LAYOUT == 2:  # words [BLOCK_K, BLOCK_N / 8], along N
                words = tl.load(qweight_ptr + offs_k[:, None] * n_packed + offs_words_n[None, :],
                                mask=mask_k[:, None] & (offs_words_n < n_packed)[None, :], other=0)  # fmt: skip
                codes = (words[:, :, None] >> word_shifts[None, None, :]) & 15
                codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
            else:  # words [BLOCK_K / 8, BLOCK_N], along K
                offs_words_k = k0 // 8 + tl.arange(0, BLOCK_K // 8).to(tl.int64)
                words = tl.load(qweight_ptr + offs_words_k[:, None] * N + offs_n[None, :],
                                mask=(offs_words_k < K // 8)[:, None] & mask_n[None, :], other=0)  # fmt: skip
                codes = (words[:, None, :] >> word_shifts[None, :, None]) & 15
                codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
            if ALIGNED_GROUPS:  # one group for the whole tile: one row of zeros and scales
                group = k0 // group_size
                zeros = (tl.load(qzeros_ptr + group * n_packed + offs_n // 8, mask=mask_n, other=0) >> (nibble * 4)) & 15
                scale = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0)
                zeros = zeros[None, :]
                scale = scale[None, :]
            else:  # act-order g_idx, or groups that straddle tiles: per input channel
                if HAS_G_IDX:
                    groups = tl.load(groups_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
                else:
                    groups = offs_k // group_size
                mask_kn = mask_k[:, None] & mask_n[None, :]
                zword = tl.load(qzeros_ptr + groups[:, None] * n_packed + (offs_n // 8)[None, :], mask=mask_kn, other=0)
                zeros = (zword >> (nibble * 4)[None, :]) & 15
                scale = tl.load(scales_ptr + groups[:, None] * N + offs_n[None, :], mask=mask_kn, other=0.0)
            if LAYOUT == 0:
                zeros = zeros + 1
            # the fp32 product of a small integer and an fp16 scale is exact; round once to the scales' dtype
            w = cast_rtne((codes - zeros).to(tl.float32) * scale.to(tl.float32), scales_ptr.dtype.element_ty)
            w = cast_rtne(w, x_ptr.dtype.element_ty)
            if BLOCK_M == 1:
                xk = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + offs_k, mask=mask_k, other=0.0)
                acc += tl.sum(xk.to(tl.float32)[:, None] * w.to(tl.float32), axis=0)
            else:
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                             mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
                if DOT_IN_FP32:
                    acc = tl.dot(xt.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, w, acc)
        if HAS_BIAS and SPLIT_K == 1:  # split-K adds the bias after summing the slices
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if BLOCK_M == 1:
                acc += b
            else:
                acc += b[None, :]
        if SPLIT_K > 1:  # fp32 partials [SPLIT_K, M, N]; out_ptr's dtype is float32
            out_ptr = out_ptr + pid_k.to(tl.int64) * M * stride_om
        if BLOCK_M == 1:
            tl.store(out_ptr + pid_m.to(tl.int64) * stride_om + offs_n, cast_rtne(acc, out_ptr.dtype.element_ty), mask=mask_n)
        else:
            out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
            tl.store(out_ptrs, cast_rtne(acc, out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def default_blocks(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): a dot-free GEMV for one row, tensor-core tiles otherwise."""
    if m == 1:
        return 1, 32, 128
    if m <= 16:
        return 16, 64, 64
    if m <= 64:
        return 64, 64, 64
    return 128, 128, 64


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_split_k(x: torch.Tensor, m: int, out_features: int, in_features: int, blocks: tuple[int, int, int]) -> int:
    """Slices of K for a GEMV whose output tiles alone would leave SMs idle (4096 outputs in 32-wide tiles
    are 128 programs on an H100's 132 SMs): enough for about two programs per SM, at most one per K tile."""
    _, block_n, block_k = blocks
    if m != 1 or not x.is_cuda:
        return 1
    tiles = -(-out_features // block_n)
    wanted = -(-2 * _multiprocessors(x.device.index if x.device.index is not None else torch.cuda.current_device()) // tiles)
    return max(1, min(wanted, -(-in_features // block_k)))


def trivial_group_size(g_idx: torch.Tensor) -> int | None:
    """The group size if g_idx is k // group_size (no act-order), else None. Reads g_idx on the host."""
    g = g_idx.cpu().long()
    boundaries = (g[1:] != g[:-1]).nonzero()
    group_size = int(boundaries[0]) + 1 if boundaries.numel() else g.numel()
    return group_size if torch.equal(g, torch.arange(g.numel()) // group_size) else None


def w4a16_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    layout: str,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    blocks: tuple[int, int, int] | None = None,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1). x is [..., K] fp16 or bf16.

    blocks = (BLOCK_M, BLOCK_N, BLOCK_K), BLOCK_M = 1 being the dot-free GEMV; BLOCK_N and BLOCK_K are
    multiples of 8. With g_idx None the groups are k // group_size, computed in the kernel, and, when
    BLOCK_K divides group_size, each tile reads one row of zeros and scales; a g_idx (int32 on x's
    device, as `QuantLinearW4A16` keeps it, for no copy per call) is always gathered (pass None for a
    trivial one, see trivial_group_size). `split_k` slices K across programs and sums fp32 partials
    (default: `default_split_k`). `out` is [M, N] contiguous. Nothing here reads a tensor on the host
    or copies one to the device, so a call can be captured in a CUDA graph.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    in_features, out_features = _shapes(qweight, scales, layout)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {in_features}")
    if in_features % 8 or out_features % 8:
        raise ValueError("in_features and out_features must be multiples of 8")
    n_groups = scales.shape[0]
    if g_idx is None:
        group_size = checked_group_size(in_features, n_groups, layout, group_size)
    elif layout == "awq":
        raise ValueError("AWQ has no g_idx")
    elif g_idx.dtype != torch.int32 or g_idx.device != x.device:
        g_idx = g_idx.to(device=x.device, dtype=torch.int32)
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    block_m, block_n, block_k = blocks = blocks or default_blocks(m)
    if block_n % 8 or block_k % 8:
        raise ValueError("BLOCK_N and BLOCK_K must be multiples of 8")
    split_k = split_k or default_split_k(x, m, out_features, in_features, blocks)
    if out is None:
        out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    target = out if split_k == 1 else torch.empty(split_k, m, out_features, dtype=torch.float32, device=x.device)
    aligned = g_idx is None and group_size % block_k == 0
    grid = (triton.cdiv(m, block_m), triton.cdiv(out_features, block_n), split_k)
    if num_warps is None:  # 4 warps spill registers on 128x128 tiles (sm_90 resource report)
        num_warps = 8 if block_m * block_n >= 64 * 128 else 4
    launch = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    _w4a16_kernel[grid](
        x2, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx if g_idx is not None else scales,
        bias if bias is not None else scales, target,
        m, out_features, in_features, group_size or 1, x2.stride(0), target.stride(-2),
        LAYOUT=_LAYOUT_ID[layout], ALIGNED_GROUPS=aligned, HAS_G_IDX=g_idx is not None, HAS_BIAS=bias is not None,
        DOT_IN_FP32=os.environ.get("TRITON_INTERPRET") == "1" and x.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, **launch,
    )  # fmt: skip
    if split_k > 1:
        summed = target.sum(0)
        if bias is not None:
            summed += bias.float()
        out.copy_(summed)  # one rounding, to nearest even
    return out.reshape(*x.shape[:-1], out_features)


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    layout: str,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x @ dequant(W) (+ bias) for a GPTQ ("gptq" v1, "gptq_v2") or AWQ ("awq") packed weight.

    backend: "auto" (Triton on CUDA when triton is installed, torch elsewhere), "triton" or "torch".
    """
    if backend == "auto":
        backend = "triton" if x.is_cuda and HAS_TRITON else "torch"
    if backend == "triton":
        return w4a16_matmul_triton(x, qweight, qzeros, scales, g_idx, layout, group_size, bias)
    if backend == "torch":
        return w4a16_matmul_reference(x, qweight, qzeros, scales, g_idx, layout, group_size, bias)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


class QuantLinearW4A16(torch.nn.Module):
    """nn.Linear stand-in holding a GPTQ or AWQ packed weight (buffers named as in the checkpoints)."""

    def __init__(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        layout: str,
        g_idx: torch.Tensor | None = None,
        group_size: int | None = None,
        bias: torch.Tensor | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.in_features, self.out_features = _shapes(qweight, scales, layout)
        self.layout, self.group_size, self.backend = layout, group_size, backend
        group_index(self.in_features, scales.shape[0], layout, g_idx, group_size)  # validates the grouping
        if g_idx is not None and group_size is None:
            group_size = trivial_group_size(g_idx)
        # a g_idx equal to k // group_size is dropped for the kernel: its aligned-groups path is faster
        self.kernel_uses_g_idx = g_idx is not None and (group_size is None or not torch.equal(
            g_idx.cpu().long(), torch.arange(self.in_features) // group_size))  # fmt: skip
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", None if g_idx is None else g_idx.to(torch.int32))  # the kernel's dtype: no cast per call
        self.register_buffer("bias", bias)

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, torch.Tensor], prefix: str, layout: str, group_size: int | None = None, backend: str = "auto"
    ) -> QuantLinearW4A16:
        """Build from checkpoint tensors `<prefix>.qweight`, `.qzeros`, `.scales`, optional `.g_idx`, `.bias`."""
        get = lambda name: state_dict.get(f"{prefix}.{name}")  # noqa: E731
        g_idx = get("g_idx") if layout != "awq" else None
        return cls(get("qweight"), get("qzeros"), get("scales"), layout, g_idx, group_size, get("bias"), backend)

    def _kernel_g_idx(self) -> torch.Tensor | None:
        return self.g_idx if self.kernel_uses_g_idx else None

    def dequantize(self) -> torch.Tensor:
        """The nn.Linear weight [out, in] in the scales' dtype."""
        return dequantize_w4a16_reference(self.qweight, self.qzeros, self.scales, self._kernel_g_idx(), self.layout, self.group_size).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_matmul(
            x, self.qweight, self.qzeros, self.scales, self._kernel_g_idx(), self.layout, self.group_size, self.bias,
            self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}"
