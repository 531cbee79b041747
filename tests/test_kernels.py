"""qtune.kernels: every Triton kernel against its torch reference, the references against bitsandbytes.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set here, before the kernels are
defined) on small, odd shapes; with CUDA the same tests run the compiled kernels on the GPU.
Outputs are poisoned with NaN before each kernel run, so unwritten elements fail the comparison.
"""

from __future__ import annotations

import os
import tempfile
import types

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit definitions

from qtune.kernels import nf4, qlora_linear, selfcheck, w4a16  # noqa: E402

try:
    import bitsandbytes.functional as bnb_functional
except ImportError:  # the GPU machine may lack it
    bnb_functional = None


def _triton_runs_here() -> bool:
    if not nf4.HAS_TRITON or CUDA:
        return nf4.HAS_TRITON
    # The interpreter needs triton itself (tl.cdiv, tl.sum, ...) imported after TRITON_INTERPRET=1;
    # when something imported it earlier, test_triton_kernels_in_a_fresh_process runs these tests.
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.cdiv, InterpretedFunction) and isinstance(nf4._nf4_dequant_kernel, InterpretedFunction)


TRITON_HERE = _triton_runs_here()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not TRITON_HERE,
    reason="triton is not installed (pip install triton)"
    if not nf4.HAS_TRITON
    else "triton was imported before TRITON_INTERPRET=1: see test_triton_kernels_in_a_fresh_process",
)
needs_bnb = pytest.mark.skipif(bnb_functional is None, reason="bitsandbytes is not importable")


@pytest.mark.skipif(not nf4.HAS_TRITON, reason="triton is not installed (pip install triton)")
@pytest.mark.skipif(TRITON_HERE, reason="the Triton tests run in this process")
def test_triton_kernels_in_a_fresh_process():
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "triton"],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-5000:]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_nf4_state(shape, blocksize=64, nested=True, dtype=torch.bfloat16, seed=0, device=DEVICE):
    """A random (packed, quant_state): random bytes and scales, no quantizer involved, no zeros in scales."""
    g = _gen(seed)
    numel = int(np.prod(shape))
    n_blocks = -(-numel // blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), generator=g, dtype=torch.uint8)
    if nested:
        absmax = torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.uint8)
        code2 = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
        absmax2 = torch.rand(-(-n_blocks // 256), generator=g) * 0.5 + 0.01
        state2 = types.SimpleNamespace(absmax=absmax2.to(device), code=code2.to(device), blocksize=256)
        offset = torch.rand((), generator=g) + 0.1
        qs = types.SimpleNamespace(absmax=absmax.to(device), state2=state2, offset=offset.to(device), nested=True)
    else:
        absmax = torch.rand(n_blocks, generator=g) * 3 + 0.01
        qs = types.SimpleNamespace(absmax=absmax.to(device), state2=None, offset=None, nested=False)
    qs.shape, qs.dtype, qs.blocksize, qs.quant_type = torch.Size(shape), dtype, blocksize, "nf4"
    return packed.to(device), qs


def as_bnb_state(qs):
    state2 = None
    if qs.nested:
        state2 = bnb_functional.QuantState(absmax=qs.state2.absmax.cpu(), code=qs.state2.code.cpu(), blocksize=qs.state2.blocksize, dtype=torch.float32)
    return bnb_functional.QuantState(
        absmax=qs.absmax.cpu(), shape=qs.shape, code=nf4.nf4_code(), blocksize=qs.blocksize, quant_type="nf4",
        dtype=qs.dtype, offset=None if qs.offset is None else qs.offset.cpu(), state2=state2,
    )  # fmt: skip


def bnb_dequant(packed, qs):
    out = bnb_functional.dequantize_4bit(packed.cpu(), qs)
    return out.reshape(qs.shape) if len(qs.shape) == 1 else out  # bnb's CPU op returns [1, n] for 1-D


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.cpu().contiguous(), expected.cpu().contiguous()
    assert not torch.isnan(a).any(), "unwritten (NaN-poisoned) or NaN elements"
    if a.dtype.is_floating_point:
        a, e = a.view(torch.uint8), e.view(torch.uint8)
    mismatch = (a != e).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} bytes differ, first at {mismatch[:3].tolist()}"


NF4_SHAPES = [(3, 7), (64, 64), (5, 333), (1, 9), (2, 1), (130,), (129,), (257, 129), (33, 200)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# ------------------------------------------------------------------------------------------ NF4


def test_nf4_table_is_bitsandbytes_table():
    if bnb_functional is None:
        pytest.skip("bitsandbytes is not importable")
    from bitsandbytes.backends.utils import _get_4bit_code

    assert torch.equal(nf4.nf4_code(), _get_4bit_code("nf4", torch.device("cpu")))


@needs_bnb
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_nf4_reference_matches_bitsandbytes_on_quantized_weights(shape, nested):
    weight = torch.randn(shape, generator=_gen(hash(shape) % 1000)) * 2 + 0.1
    packed, qs = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)
    for dtype in DTYPES:
        qs.dtype = dtype
        assert_bitwise_equal(nf4.dequantize_nf4_reference(packed, qs), bnb_dequant(packed, qs))
        assert_bitwise_equal(nf4.dequantize_nf4(packed, qs), bnb_dequant(packed, qs))


@needs_bnb
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_reference_matches_bitsandbytes_on_random_states(blocksize, nested):
    for seed, shape in enumerate([(37, 91), (4, 1000), (1, 255)]):
        packed, qs = random_nf4_state(shape, blocksize, nested, seed=seed, device="cpu")
        for dtype in DTYPES:
            qs.dtype = dtype
            assert_bitwise_equal(nf4.dequantize_nf4_reference(packed, qs), bnb_dequant(packed, as_bnb_state(qs)))


def test_nf4_quant_storage_other_than_uint8():
    packed, qs = random_nf4_state((6, 10), device="cpu", seed=3)
    as_bf16 = packed.view(-1).view(torch.bfloat16).reshape(-1, 1)  # bnb's quant_storage=torch.bfloat16
    assert_bitwise_equal(nf4.dequantize_nf4_reference(as_bf16, qs), nf4.dequantize_nf4_reference(packed, qs))


@needs_triton
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_nf4_triton_matches_reference(shape, nested, blocksize):
    packed, qs = random_nf4_state(shape, blocksize, nested, seed=len(shape) * 1000 + shape[0] + blocksize)
    numel = int(np.prod(shape))
    for dtype in DTYPES:
        out = torch.full((numel,), float("nan"), dtype=dtype, device=DEVICE)
        actual = nf4.dequantize_nf4_triton(packed, qs, dtype, out=out)
        assert_bitwise_equal(actual, nf4.dequantize_nf4_reference(packed, qs, dtype))


@needs_triton
@needs_bnb
def test_nf4_triton_matches_bitsandbytes():
    weight = torch.randn(67, 45, generator=_gen(11))
    packed, qs = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    qs.dtype = torch.float16
    expected = bnb_dequant(packed, qs)
    qs.to(DEVICE)
    assert_bitwise_equal(nf4.dequantize_nf4(packed.to(DEVICE), qs, backend="triton"), expected)


@needs_triton
def test_nf4_triton_bf16_rounds_ties_to_even():
    # absmax values whose product with code 1.0 (nibble 15) sits exactly halfway between two bf16 values
    ties = [0x3F808000, 0x3F818000, 0x40000001, 0x3F7FFFFF, 0x7F7FFFFF]  # even tie, odd tie, above, carry, overflow
    absmax = torch.tensor(ties, dtype=torch.int32).view(torch.float32)
    packed = torch.full((len(ties) * 32, 1), 0xFF, dtype=torch.uint8)
    qs = types.SimpleNamespace(absmax=absmax.to(DEVICE), nested=False, state2=None, offset=None, quant_type="nf4",
                               shape=torch.Size((len(ties), 64)), dtype=torch.bfloat16, blocksize=64)  # fmt: skip
    actual = nf4.dequantize_nf4_triton(packed.to(DEVICE), qs)
    assert_bitwise_equal(actual, absmax[:, None].expand(-1, 64).to(torch.bfloat16))


def test_nf4_dispatch_and_errors():
    packed, qs = random_nf4_state((4, 6), device="cpu")
    assert_bitwise_equal(nf4.dequantize_nf4(packed, qs), nf4.dequantize_nf4_reference(packed, qs))
    with pytest.raises(ValueError, match="backend"):
        nf4.dequantize_nf4(packed, qs, backend="cuda")
    qs.quant_type = "fp4"
    with pytest.raises(ValueError, match="nf4"):
        nf4.dequantize_nf4_reference(packed, qs)


def test_kernels_folder_is_not_a_top_level_package(tmp_path):
    import subprocess
    import sys

    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    origin = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert os.path.dirname(nf4.__file__) not in origin.stdout


# ------------------------------------------------------------------------------------------ W4A16


def pack_rows_lsb_first(codes: torch.Tensor) -> torch.Tensor:
    """[8R, C] codes -> int32 [R, C]: row 8r + j in nibble j (GPTQ qweight)."""
    c = codes.numpy().astype(np.uint32).reshape(-1, 8, codes.shape[1])
    words = np.zeros((c.shape[0], c.shape[2]), np.uint32)
    for j in range(8):
        words |= c[:, j, :] << np.uint32(4 * j)
    return torch.from_numpy(words.view(np.int32))


def pack_columns(codes: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[R, 8C] codes -> int32 [R, C]: nibble i holds column 8c + order[i] (GPTQ qzeros; AWQ with its order)."""
    c = codes.numpy().astype(np.uint32).reshape(codes.shape[0], -1, 8)
    words = np.zeros(c.shape[:2], np.uint32)
    for i, column in enumerate(order):
        words |= c[:, :, column] << np.uint32(4 * i)
    return torch.from_numpy(words.view(np.int32))


def random_w4a16(layout, in_features, out_features, group_size, act_order=False, seed=0, bias=False):
    g = _gen(seed)
    n_groups = -(-in_features // group_size)
    codes = torch.randint(0, 16, (in_features, out_features), generator=g)
    zeros = torch.randint(1, 16, (n_groups, out_features), generator=g)  # v1 stores zero - 1 >= 0
    scales = (torch.rand(n_groups, out_features, generator=g) * 0.02 + 0.002).half()
    g_idx = None
    if layout == "awq":
        qweight, qzeros = pack_columns(codes, w4a16.AWQ_ORDER), pack_columns(zeros, w4a16.AWQ_ORDER)
    else:
        qweight = pack_rows_lsb_first(codes)
        qzeros = pack_columns(zeros - 1 if layout == "gptq" else zeros)
        g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
        if act_order:
            g_idx = g_idx[torch.randperm(in_features, generator=g)]
    b = (torch.randn(out_features, generator=g) * 0.1).half() if bias else None
    tensors = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, bias=b)
    group = g_idx.long() if g_idx is not None else torch.arange(in_features) // group_size
    expected_weight = (codes - zeros[group]).float() * scales[group].float()  # the spec's dequant, in fp32
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in tensors.items()}, expected_weight


@pytest.mark.parametrize("layout", w4a16.LAYOUTS)
def test_w4a16_reference_dequant_follows_the_spec(layout):
    t, expected = random_w4a16(layout, 48, 24, 16, act_order=layout == "gptq", seed=1)
    weight = w4a16.dequantize_w4a16_reference(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], layout, 16)
    assert_bitwise_equal(weight.cpu(), expected.half())


def test_w4a16_gptq_v1_symmetric_fingerprint():
    t, _ = random_w4a16("gptq", 16, 8, 16)
    codes, zeros = w4a16.unpack_w4a16_reference(t["qweight"], torch.full_like(t["qzeros"], 0x77777777), "gptq")
    assert (zeros == 8).all()


def w4a16_tolerance(dtype):
    # fp32 accumulation in a different order, then one rounding to dtype: a few ulp of the output
    return dict(rtol=2 * 2.0**-8, atol=0) if dtype == torch.bfloat16 else dict(rtol=2 * 2.0**-11, atol=0)


W4A16_CASES = [  # layout, K, N, group size, act-order, drop a trivial g_idx, BLOCK_K
    ("gptq", 72, 40, 16, True, False, 32),  # act-order gather; K, N not multiples of the tiles
    ("gptq", 40, 24, 32, False, True, 32),  # aligned groups (one zeros/scales row per tile), ragged last group
    ("gptq", 40, 24, 32, False, False, 16),  # trivial g_idx passed in: gathered
    ("gptq_v2", 56, 48, 24, True, False, 16),
    ("awq", 64, 40, 16, False, True, 16),  # aligned
    ("awq", 96, 40, 32, False, True, 64),  # BLOCK_K does not divide the group size: gathered
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout,in_features,out_features,group_size,act_order,drop_g_idx,block_k", W4A16_CASES)
@pytest.mark.parametrize("m", [1, 5, 19])
def test_w4a16_triton_matches_reference(layout, in_features, out_features, group_size, act_order, drop_g_idx,
                                        block_k, m, dtype):  # fmt: skip
    t, _ = random_w4a16(layout, in_features, out_features, group_size, act_order, seed=m, bias=m in (1, 5))
    g_idx = None if drop_g_idx else t["g_idx"]
    x = torch.randn(m, in_features, generator=_gen(m)).to(dtype).to(DEVICE)
    args = (t["qweight"], t["qzeros"], t["scales"], g_idx, layout, group_size, t["bias"])
    expected = w4a16.w4a16_matmul_reference(x, *args)
    blocks = (1, 32, block_k) if m == 1 else (16, 32, block_k)  # several tiles, ragged edges
    out = torch.full((m, out_features), float("nan"), dtype=dtype, device=DEVICE)
    actual = w4a16.w4a16_matmul_triton(x, *args, blocks=blocks, out=out)
    assert not torch.isnan(actual).any()
    tol = w4a16_tolerance(dtype)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=tol["rtol"] * scale * 0.5)


@needs_triton
@pytest.mark.parametrize("group_size", [8, 16])  # 16: the aligned-groups path where g_idx is None
@pytest.mark.parametrize("layout", w4a16.LAYOUTS)
def test_w4a16_triton_dequant_is_exact(layout, group_size):
    # x = identity picks rows of W out of the kernel: every product is w * 1 and every sum exact
    in_features, out_features = 40, 24
    t, _ = random_w4a16(layout, in_features, out_features, group_size, act_order=layout == "gptq", seed=5)
    g_idx = t["g_idx"] if layout == "gptq" else None
    eye = torch.eye(in_features, dtype=torch.float16, device=DEVICE)
    args = (t["qweight"], t["qzeros"], t["scales"], g_idx, layout, group_size)
    weight = w4a16.dequantize_w4a16_reference(*args)
    assert_bitwise_equal(w4a16.w4a16_matmul_triton(eye, *args, blocks=(16, 16, 16)), weight)
    assert_bitwise_equal(w4a16.w4a16_matmul_triton(eye[3:4], *args, blocks=(1, 16, 16)), weight[3:4])


@needs_triton
@pytest.mark.parametrize("m,blocks", [(1, (1, 16, 16)), (5, (16, 16, 16))])
@pytest.mark.parametrize("layout,act_order,group_size", [("gptq", True, 8), ("gptq_v2", False, 24), ("awq", False, 8)])
def test_w4a16_triton_split_k_matches_the_reference(layout, act_order, group_size, m, blocks):
    t, _ = random_w4a16(layout, 136, 40, group_size, act_order, seed=3, bias=True)
    g_idx = t["g_idx"] if act_order else None
    x = torch.randn(m, 136, generator=_gen(4)).half().to(DEVICE)
    args = (t["qweight"], t["qzeros"], t["scales"], g_idx, layout, group_size, t["bias"])
    expected = w4a16.w4a16_matmul_reference(x, *args)
    tol = w4a16_tolerance(torch.float16)
    for split_k in (2, 3, 17):  # 17 slices of 9 K tiles: the last ones are empty
        out = torch.full((m, 40), float("nan"), dtype=torch.float16, device=DEVICE)
        actual = w4a16.w4a16_matmul_triton(x, *args, blocks=blocks, out=out, split_k=split_k)
        torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=tol["rtol"] * expected.abs().max().item() * 0.5)


def test_w4a16_default_split_k_fills_the_gpu(monkeypatch):
    monkeypatch.setattr(w4a16, "_multiprocessors", lambda index: 132)
    cuda = types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=0))
    # 4096 outputs in 32-wide tiles: 128 programs for 132 SMs without a split
    assert w4a16.default_split_k(cuda, 1, 4096, 14336, (1, 32, 128)) == 3
    assert w4a16.default_split_k(cuda, 1, 14336, 4096, (1, 32, 128)) == 1  # 448 tiles already
    assert w4a16.default_split_k(cuda, 1, 64, 256, (1, 32, 128)) == 2  # never more slices than K tiles
    assert w4a16.default_split_k(cuda, 64, 4096, 14336, (64, 64, 64)) == 1  # batches: no split
    assert w4a16.default_split_k(torch.zeros(1), 1, 4096, 14336, (1, 32, 128)) == 1  # not on CUDA


@needs_triton
@pytest.mark.parametrize("act_order", [True, False])
def test_w4a16_triton_module_call_does_no_host_work(act_order, monkeypatch):
    """What a CUDA graph needs: no tensor built on the host or copied per call (g_idx is int32 at load)."""
    t, _ = random_w4a16("gptq", 48, 32, 16, act_order=act_order, seed=9, bias=True)
    state_dict = {f"layer.{k}": v.to(torch.int64) if k == "g_idx" else v for k, v in t.items() if v is not None}
    module = w4a16.QuantLinearW4A16.from_state_dict(state_dict, "layer", "gptq", backend="triton")
    assert module.g_idx.dtype == torch.int32
    x = torch.randn(1, 48, generator=_gen(2)).half().to(DEVICE)
    expected = module(x)

    def host_work(*args, **kwargs):
        raise AssertionError("built a tensor on the host during the call")

    for name in ("arange", "tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, host_work)
    monkeypatch.setattr(w4a16, "group_index", host_work)
    assert torch.equal(module(x), expected)


def test_trivial_group_size():
    assert w4a16.trivial_group_size(torch.arange(40) // 16) == 16
    assert w4a16.trivial_group_size(torch.zeros(40, dtype=torch.int32)) == 40
    assert w4a16.trivial_group_size(torch.tensor([0, 0, 1, 1, 0, 1])) is None


def test_quant_linear_w4a16_module():
    t, expected = random_w4a16("gptq", 48, 32, 16, act_order=True, seed=9, bias=True)
    state_dict = {f"layer.{k}": v for k, v in t.items() if v is not None}
    module = w4a16.QuantLinearW4A16.from_state_dict(state_dict, "layer", "gptq", backend="torch")
    assert (module.in_features, module.out_features, module.kernel_uses_g_idx) == (48, 32, True)
    trivial = dict(state_dict, **{"layer.g_idx": torch.arange(48, dtype=torch.int32).to(DEVICE) // 16})
    assert not w4a16.QuantLinearW4A16.from_state_dict(trivial, "layer", "gptq").kernel_uses_g_idx
    assert_bitwise_equal(module.dequantize().cpu(), expected.half().t())
    x = torch.randn(2, 3, 48, generator=_gen(2)).half().to(DEVICE)
    y = module(x)
    assert y.shape == (2, 3, 32)
    ref = torch.nn.functional.linear(x.float(), module.dequantize().float(), t["bias"].float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    if TRITON_HERE:
        module.backend = "triton"
        torch.testing.assert_close(module(x).float(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    with pytest.raises(ValueError, match="group_size"):
        w4a16.QuantLinearW4A16(t["qweight"], t["qzeros"], t["scales"], "gptq")


# ------------------------------------------------------------------------------------------ fused QLoRA linear


def qlora_case(x_dtype, compute_dtype, seed, bias=True, out_features=40, in_features=70, rank=4):
    g = _gen(seed)
    packed, qs = random_nf4_state((out_features, in_features), 64, True, compute_dtype, seed=seed)
    x = torch.randn(2, 3, in_features, generator=g).to(x_dtype).to(DEVICE).requires_grad_()
    lora_A = (torch.randn(rank, in_features, generator=g) * 0.2).to(DEVICE).requires_grad_()
    lora_B = (torch.randn(out_features, rank, generator=g) * 0.2).to(DEVICE).requires_grad_()
    b = (torch.randn(out_features, generator=g) * 0.1).to(compute_dtype).to(DEVICE).requires_grad_() if bias else None
    grad_y = torch.randn(2, 3, out_features, generator=g).to(x_dtype).to(DEVICE)
    return packed, qs, x, lora_A, lora_B, b, grad_y


def forward_backward(fn, leaves, grad_y):
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(grad_y)
    return [y.detach()] + [t.grad for t in leaves]


def independent_qlora(x, packed, qs, lora_A, lora_B, bias, scaling, compute_dtype, dropout_p=0.0, seed=0):
    """bitsandbytes' Linear4bit + peft's LoRA, written out with plain autograd."""
    weight = nf4.dequantize_nf4_reference(packed, qs, compute_dtype)
    base = torch.nn.functional.linear(x.to(compute_dtype), weight, None if bias is None else bias.to(compute_dtype))
    x_lora = x.to(lora_A.dtype)
    if dropout_p:
        torch.manual_seed(seed)
        x_lora = torch.nn.functional.dropout(x_lora, dropout_p)
    return base.to(x.dtype) + (((x_lora @ lora_A.t()) @ lora_B.t()) * scaling).to(x.dtype)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("x_dtype,compute_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float32, torch.bfloat16)])  # fmt: skip
def test_qlora_linear_gradients_match_autograd(backend, x_dtype, compute_dtype):
    packed, qs, x, lora_A, lora_B, bias, grad_y = qlora_case(x_dtype, compute_dtype, seed=hash(str(x_dtype)) % 97)
    leaves = [x, lora_A, lora_B, bias]
    expected = forward_backward(lambda: independent_qlora(x, packed, qs, lora_A, lora_B, bias, 0.5, compute_dtype), leaves, grad_y)
    as_op = forward_backward(
        lambda: qlora_linear.qlora_linear(x, x, packed, qs, lora_A, lora_B, 0.5, bias, compute_dtype, backend),
        leaves, grad_y,
    )  # fmt: skip
    as_function = forward_backward(
        lambda: qlora_linear.QLoRALinearFunction.apply(x, x, packed, qs, lora_A, lora_B, bias, 0.5, compute_dtype, backend),
        leaves, grad_y,
    )  # fmt: skip
    # same dequantized weight (bit-identical); matmul grads differ only in accumulation order
    tol = dict(rtol=1e-5, atol=1e-5) if x_dtype == compute_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, result in [("op", as_op), ("function", as_function)]:
        for what, a, e in zip(["y", "grad x", "grad A", "grad B", "grad bias"], result, expected):
            assert a.dtype == e.dtype, (name, what)
            scale = e.abs().max().item()
            torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=f"{name} {what}")


@needs_triton
@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize,nested", [((40, 128), 64, True), ((24, 256), 128, False), ((72, 64), 32, True)])
def test_nf4_triton_matmuls_read_the_weight_bit_exactly(shape, blocksize, nested, dtype):
    """With x = I every output of the fused GEMMs is one product w * 1: the tiles they dequantize inside
    the GEMM are bitsandbytes' values bit for bit, in both the forward and the input-gradient kernel."""
    from qtune.kernels import nf4_matmul

    weight = torch.randn(shape, generator=_gen(blocksize)) * 0.05
    packed, qs = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    qs.dtype = dtype
    expected = bnb_dequant(packed, qs).to(DEVICE)  # bitsandbytes' own dequant, on the host
    qs.to(DEVICE)  # QuantState moves in place
    packed = packed.to(DEVICE)
    assert nf4_matmul.supports(qs.blocksize, shape[1])
    assert_bitwise_equal(nf4_matmul.nf4_linear(torch.eye(shape[1], dtype=dtype, device=DEVICE), packed, qs), expected.t().contiguous())
    assert_bitwise_equal(nf4_matmul.nf4_linear_grad(torch.eye(shape[0], dtype=dtype, device=DEVICE), packed, qs), expected)
    x = torch.randn(3, 5, shape[1], generator=_gen(1)).to(dtype).to(DEVICE)
    torch.testing.assert_close(nf4_matmul.nf4_linear(x, packed, qs).float(), (x.float() @ expected.float().t()), rtol=1e-2, atol=1e-2)


@needs_triton
@pytest.mark.parametrize("x_dtype,compute_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)])
def test_qlora_linear_on_the_triton_nf4_matmuls_matches_autograd(x_dtype, compute_dtype):
    packed, qs, x, lora_A, lora_B, bias, grad_y = qlora_case(x_dtype, compute_dtype, seed=11, in_features=128)
    nf4_args = qlora_linear.nf4_weight_args(packed, qs)
    assert isinstance(qlora_linear._base_weight(nf4_args, compute_dtype, "triton"), qlora_linear._NF4Matmuls)
    assert not isinstance(qlora_linear._base_weight(nf4_args, compute_dtype, "torch"), qlora_linear._NF4Matmuls)
    leaves = [x, lora_A, lora_B, bias]
    expected = forward_backward(lambda: independent_qlora(x, packed, qs, lora_A, lora_B, bias, 0.5, compute_dtype), leaves, grad_y)
    for name, fn in [
        ("op", lambda: qlora_linear.qlora_linear(x, x, packed, qs, lora_A, lora_B, 0.5, bias, compute_dtype, "triton")),
        ("function", lambda: qlora_linear.QLoRALinearFunction.apply(x, x, packed, qs, lora_A, lora_B, bias, 0.5, compute_dtype, "triton")),
    ]:
        tol = 1e-5 if x_dtype == compute_dtype == torch.float32 else 2e-2
        for what, a, e in zip(["y", "grad x", "grad A", "grad B", "grad bias"], forward_backward(fn, leaves, grad_y), expected):
            assert a.dtype == e.dtype, (name, what)
            torch.testing.assert_close(a, e, rtol=tol, atol=tol * e.abs().max().item(), msg=f"{name} {what}")


def test_qlora_linear_with_dropout_routes_the_dropout_gradient():
    packed, qs, x, lora_A, lora_B, bias, grad_y = qlora_case(torch.float32, torch.float32, seed=4, bias=False)
    leaves = [x, lora_A, lora_B]

    def fused():
        torch.manual_seed(7)
        x_lora = torch.nn.functional.dropout(x, 0.3)
        return qlora_linear.qlora_linear(x, x_lora, packed, qs, lora_A, lora_B, 2.0)

    expected = forward_backward(lambda: independent_qlora(x, packed, qs, lora_A, lora_B, None, 2.0, torch.float32, 0.3, seed=7), leaves, grad_y)
    for a, e in zip(forward_backward(fused, leaves, grad_y), expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_qlora_linear_saves_no_dequantized_weight():
    packed, qs, x, lora_A, lora_B, bias, grad_y = qlora_case(torch.float32, torch.float32, seed=5)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = qlora_linear.qlora_linear(x, x, packed, qs, lora_A, lora_B, 0.5, bias)
    weight_shape = tuple(qs.shape)
    assert not [s for s in saved if s[0] in (weight_shape, weight_shape[::-1]) and s[1].is_floating_point]
    y.backward(grad_y)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_qlora_linear_under_torch_compile(backend):
    packed, qs, x, lora_A, lora_B, bias, grad_y = qlora_case(torch.float32, torch.float32, seed=6)
    leaves = [x, lora_A, lora_B, bias]
    eager = forward_backward(lambda: qlora_linear.qlora_linear(x, x, packed, qs, lora_A, lora_B, 0.5, bias), leaves, grad_y)
    compiled_fn = torch.compile(lambda x: qlora_linear.qlora_linear(x, x, packed, qs, lora_A, lora_B, 0.5, bias), backend=backend, fullgraph=True)
    compiled = forward_backward(lambda: compiled_fn(x), leaves, grad_y)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


# ------------------------------------------------------------------------------------------ peft integration


@pytest.fixture(scope="module")
def tiny_qlora_model():
    if bnb_functional is None:
        pytest.skip("bitsandbytes is not importable")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from support import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tiny_model("llama", 0, vocab_size=97, hidden_size=72, intermediate_size=136, max_position_embeddings=2048).save_pretrained(tmp)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        placement = {"device_map": {"": DEVICE}} if CUDA else {}
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=torch.float32, **placement)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(model, lora)
    model.train()  # in eval mode, bitsandbytes repacks CPU weights into a layout of its own
    return model


def training_step(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach().clone(), grads


@pytest.mark.parametrize("autocast", [False, True])
def test_patch_peft_model_matches_peft(tiny_qlora_model, autocast):
    model = tiny_qlora_model
    ids = torch.randint(0, 97, (2, 11), generator=_gen(1)).to(DEVICE)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        expected_logits, expected_grads = training_step(model, ids)
        try:
            assert qlora_linear.patch_peft_model(model, backend="torch") == 14  # 7 linears x 2 layers
            assert qlora_linear.patch_peft_model(model, backend="torch") == 14  # idempotent
            logits, grads = training_step(model, ids)
        finally:
            assert qlora_linear.unpatch_peft_model(model) == 14
    tol = 2e-2 if autocast else 1e-4
    torch.testing.assert_close(logits, expected_logits, rtol=tol, atol=tol * expected_logits.abs().max().item())
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        err = ((grad - expected_grads[name]).norm() / expected_grads[name].norm()).item()
        assert err < tol, (name, err)


@needs_triton
@needs_bnb
def test_triton_nf4_matmuls_in_a_peft_model_match_peft_with_dropout_and_rslora(monkeypatch):
    """Widths that are multiples of the NF4 block take the fused GEMMs: logits and every LoRA gradient
    against peft + bitsandbytes, with LoRA dropout (the same mask on both sides) and rsLoRA's scaling."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from support import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tiny_model("llama", 3, vocab_size=97).save_pretrained(tmp)  # hidden 64, intermediate 128
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        placement = {"device_map": {"": DEVICE}} if CUDA else {}
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=torch.float32, **placement)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1, use_rslora=True, init_lora_weights=False)
    model = get_peft_model(model, lora).train()
    ids = torch.randint(0, 97, (2, 9), generator=_gen(5)).to(DEVICE)

    def step():
        torch.manual_seed(7)  # the same dropout masks on both sides
        return training_step(model, ids)

    expected_logits, expected_grads = step()
    calls = []
    fused_linear = qlora_linear.nf4_linear
    monkeypatch.setattr(qlora_linear, "nf4_linear", lambda *a: calls.append(1) or fused_linear(*a))
    try:
        assert qlora_linear.patch_peft_model(model, backend="triton") == 14
        logits, grads = step()
    finally:
        qlora_linear.unpatch_peft_model(model)
    assert len(calls) == 14  # every layer's forward ran the fused GEMM
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4 * expected_logits.abs().max().item())
    assert grads.keys() == expected_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        err = ((grad - expected_grads[name]).norm() / expected_grads[name].norm()).item()
        assert err < 1e-4, (name, err)


def test_patched_layers_fall_back_when_fusion_does_not_apply(tiny_qlora_model):
    model = tiny_qlora_model
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    qlora_linear.patch_peft_model(model, backend="torch")
    calls = []
    original = layer._qtune_unfused_forward
    layer._qtune_unfused_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        x = torch.randn(1, 2, 72, device=DEVICE)
        layer(x)
        assert calls == []
        with model.disable_adapter():
            layer(x)
        assert calls == [1]
    finally:
        layer._qtune_unfused_forward = original
        qlora_linear.unpatch_peft_model(model)


# ------------------------------------------------------------------------------------------ self-check and fallback


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path))
    monkeypatch.delenv(selfcheck.RECHECK_ENV, raising=False)
    return tmp_path / "kernel-checks"


def unpatched(model) -> bool:
    return not any("_qtune_unfused_forward" in m.__dict__ for m in model.modules())


@needs_bnb
@pytest.mark.parametrize(
    "config",
    [
        selfcheck.KernelConfig("float32", "bfloat16", "float32", None, 64, True, True),
        selfcheck.KernelConfig("float32", "float32", "float32", None, 64, False, False),
        selfcheck.KernelConfig("bfloat16", "bfloat16", "float32", "bfloat16", 64, True, False),
        selfcheck.KernelConfig("float16", "float16", "float32", "float16", 128, True, True),
    ],
    ids=lambda c: c.describe(),
)
@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("triton", marks=needs_triton)])  # CPU auto: bitsandbytes' op
def test_self_check_passes_against_peft_and_bitsandbytes(config, backend):
    assert selfcheck.run_check(config, torch.device(DEVICE), backend) == ""


@needs_triton
@needs_bnb
def test_self_check_catches_a_wrong_triton_gemm(monkeypatch):
    config = selfcheck.KernelConfig("float32", "float32", "float32", None, 64, True, False)
    fused_linear = qlora_linear.nf4_linear

    def one_tile_off(x, packed, state):
        y = fused_linear(x, packed, state)
        y[..., :4] *= 1.001  # one output column tile slightly off
        return y

    monkeypatch.setattr(qlora_linear, "nf4_linear", one_tile_off)
    assert selfcheck.run_check(config, torch.device(DEVICE), "triton") == (
        "fused NF4 GEMM (forward): the weight it reads differs from bitsandbytes' dequant (a 256-wide layer)"
    )


@needs_bnb
def test_self_check_catches_one_wrong_value_and_a_wrong_gradient(monkeypatch):
    config = selfcheck.KernelConfig("bfloat16", "bfloat16", "float32", "bfloat16", 64, True, False)
    dequantize = qlora_linear.dequantize_nf4

    def one_value_off(packed, quant_state, dtype, backend):
        weight = dequantize(packed, quant_state, dtype, backend).clone()
        weight.view(-1)[5] *= 1.5
        return weight

    monkeypatch.setattr(qlora_linear, "dequantize_nf4", one_value_off)
    assert "NF4 dequant: 1 of" in selfcheck.run_check(config, torch.device(DEVICE))
    monkeypatch.setattr(qlora_linear, "dequantize_nf4", dequantize)
    backward = qlora_linear._qlora_backward

    def grad_a_off(*args):
        grad_x, grad_x_lora, grad_A, grad_B, grad_bias = backward(*args)
        return grad_x, grad_x_lora, grad_A * 1.1, grad_B, grad_bias

    monkeypatch.setattr(qlora_linear, "_qlora_backward", grad_a_off)
    assert selfcheck.run_check(config, torch.device(DEVICE)).startswith("grad A: relative error")


def test_self_check_verdicts_are_cached_per_device_and_versions(kernel_cache, monkeypatch):
    config = selfcheck.KernelConfig("float32", "float32", "float32", None, 64, True, False)
    calls = []
    monkeypatch.setattr(selfcheck, "run_check", lambda c, d, b="auto": calls.append(c) or "")
    device = torch.device("cpu")
    assert [(v.ok, v.cached) for v in selfcheck.check([config], device)] == [(True, False)]
    assert [(v.ok, v.cached) for v in selfcheck.check([config], device)] == [(True, True)]
    assert len(calls) == 1 and len(list(kernel_cache.glob("*.json"))) == 1
    monkeypatch.setenv(selfcheck.RECHECK_ENV, "1")
    selfcheck.check([config], device)
    monkeypatch.delenv(selfcheck.RECHECK_ENV)
    assert len(calls) == 2
    fingerprint = selfcheck.fingerprint(device)
    monkeypatch.setattr(selfcheck, "fingerprint", lambda d: {**fingerprint, "triton": "9.9.9"})  # an upgrade
    assert [(v.ok, v.cached) for v in selfcheck.check([config], device)] == [(True, False)]
    assert len(calls) == 3


@needs_bnb
def test_fuse_patches_every_4bit_lora_layer_after_its_self_check(tiny_qlora_model, kernel_cache):
    from qtune.training import fuse

    model = tiny_qlora_model
    try:
        result = fuse(model, required=True, autocast=None)
        assert (result.patched, result.layers, result.left_out, result.off_because) == (14, 14, {}, "")
        assert len(list(kernel_cache.glob("*.json"))) == 1  # one configuration: fp32 x, bf16 compute, nested
    finally:
        qlora_linear.unpatch_peft_model(model)


@needs_bnb
def test_fuse_falls_back_when_a_kernel_fails_to_compile(tiny_qlora_model, kernel_cache, monkeypatch):
    from qtune.errors import QtuneError
    from qtune.training import fuse

    def compile_error(*args):
        raise RuntimeError("CompilationError: at 12:4: simulated failure to compile")

    monkeypatch.setattr(qlora_linear, "dequantize_nf4", compile_error)
    result = fuse(tiny_qlora_model, required=False, autocast=None)
    assert result.patched == 0 and result.layers == 14 and unpatched(tiny_qlora_model)
    assert "failed their self-check" in result.off_because and "simulated failure to compile" in result.off_because
    with pytest.raises(QtuneError, match="fused_kernels is on, but they failed their self-check.*simulated"):
        fuse(tiny_qlora_model, required=True, autocast=None)
    assert unpatched(tiny_qlora_model)


@needs_bnb
def test_fuse_names_the_layers_it_leaves_out(tiny_qlora_model, kernel_cache):
    """As when peft wraps a 4-bit linear in its plain LoRA layer (a model quantized after get_peft_model)."""
    from peft.tuners.lora.layer import Linear as PlainLoraLinear

    from qtune.errors import QtuneError
    from qtune.training import fuse

    name = "base_model.model.model.layers.1.mlp.down_proj"
    layer = tiny_qlora_model.get_submodule(name)
    real_class = type(layer)
    layer.__class__ = PlainLoraLinear
    try:
        result = fuse(tiny_qlora_model, required=False, autocast=None)
        assert (result.patched, result.layers) == (13, 14)
        assert result.left_out == {name: "peft wrapped it as Linear, not its bitsandbytes LoRA layer"}
        assert "_qtune_unfused_forward" not in layer.__dict__
        qlora_linear.unpatch_peft_model(tiny_qlora_model)
        with pytest.raises(QtuneError, match=f"1 of 14 4-bit LoRA layers cannot take them: {name}: peft wrapped"):
            fuse(tiny_qlora_model, required=True, autocast=None)
    finally:
        layer.__class__ = real_class
        qlora_linear.unpatch_peft_model(tiny_qlora_model)


@needs_bnb
def test_fused_kernels_switch(tiny_qlora_model, kernel_cache):
    from qtune.recipe import Recipe
    from qtune.training import use_fused_kernels

    off = use_fused_kernels(tiny_qlora_model, Recipe(training={"fused_kernels": "off"}))
    assert (off.patched, off.off_because) == (0, "training.fused_kernels is off")
    auto = use_fused_kernels(tiny_qlora_model, Recipe(training={"fused_kernels": "auto"}))
    assert auto.patched == (14 if CUDA else 0)
    assert CUDA or auto.off_because.startswith("no CUDA device")
    qlora_linear.unpatch_peft_model(tiny_qlora_model)


# ------------------------------------------------------------------------------------------ compiled for Hopper

SM90_CHECK = r"""
import json, re, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import compile as triton_compile
from qtune.kernels import nf4, nf4_matmul, w4a16

def ptx(kernel, signature, constexprs, options):
    # as a launch with 16-byte aligned pointers and sizes specializes it
    attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind != "constexpr"}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton_compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

def nf4_ptx(out, nested):
    signature = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "nested_absmax_ptr": "*fp32",
                 "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": out,
                 "numel": "i32", "nested_blocksize": "i32", "BLOCKSIZE": "constexpr", "BLOCKS_PER_PROGRAM": "constexpr",
                 "NESTED": "constexpr"}
    return ptx(nf4._nf4_dequant_kernel, signature, {"BLOCKSIZE": 64, "BLOCKS_PER_PROGRAM": 32, "NESTED": nested},
               dict(nf4.NF4_COMPILE_OPTIONS, num_warps=4))

def w4_ptx(dtype, layout, aligned, g_idx, blocks, split_k):
    out = "*fp32" if split_k > 1 else dtype
    signature = {"x_ptr": dtype, "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": dtype,
                 "groups_ptr": "*i32", "bias_ptr": dtype, "out_ptr": out, "M": "i32", "N": "i32", "K": "i32",
                 "group_size": "i32", "stride_xm": "i32", "stride_om": "i32", "LAYOUT": "constexpr",
                 "ALIGNED_GROUPS": "constexpr", "HAS_G_IDX": "constexpr", "HAS_BIAS": "constexpr",
                 "DOT_IN_FP32": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                 "SPLIT_K": "constexpr"}
    constexprs = {"LAYOUT": layout, "ALIGNED_GROUPS": aligned, "HAS_G_IDX": g_idx, "HAS_BIAS": True, "DOT_IN_FP32": False,
                  "BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "BLOCK_K": blocks[2], "SPLIT_K": split_k}
    return ptx(w4a16._w4a16_kernel, signature, constexprs, {"num_warps": 8 if blocks[0] * blocks[1] >= 64 * 128 else 4})

def nf4_gemm_ptx(kernel, dtype, nested, blocks):
    signature = {"x_ptr": dtype, "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "nested_absmax_ptr": "*fp32",
                 "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": dtype,
                 "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32", "nested_blocksize": "i32",
                 "BLOCKSIZE": "constexpr", "NESTED": "constexpr", "DOT_IN_FP32": "constexpr", "BLOCK_M": "constexpr",
                 "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    if kernel is nf4_matmul._nf4_linear_grad_kernel:
        signature = {("g_ptr" if k == "x_ptr" else "stride_gm" if k == "stride_xm" else k): v for k, v in signature.items()}
    block_m, block_n, block_k, warps = blocks
    constexprs = {"BLOCKSIZE": 64, "NESTED": nested, "DOT_IN_FP32": dtype == "*fp32", "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    return ptx(kernel, signature, constexprs, dict(nf4.NF4_COMPILE_OPTIONS, num_warps=warps))

# every output dtype and both NF4 layouts training can ask for
nf4_ptxs = {f"{out} nested={nested}": nf4_ptx(out, nested) for out in ("*bf16", "*fp16", "*fp32") for nested in (True, False)}
# the fused NF4 GEMMs of the QLoRA layer: forward and input gradient, every compute dtype, both tile heights
nf4_gemms = {f"{kernel.__name__} {dtype} nested={nested} rows={m}": nf4_gemm_ptx(kernel, dtype, nested, nf4_matmul._blocks(m))
             for kernel in (nf4_matmul._nf4_linear_kernel, nf4_matmul._nf4_linear_grad_kernel)
             for dtype in ("*bf16", "*fp16", "*fp32") for nested in (True, False) for m in (1, 64, 2048)}
# every tile shape default_blocks picks, both dtypes, aligned/act-order/straddling groups, split-K GEMV
w4_cases = {}
for dtype in ("*fp16", "*bf16"):
    for layout in (0, 1, 2):
        for blocks in ((1, 32, 128), (16, 64, 64), (64, 64, 64), (128, 128, 64)):
            w4_cases[f"{dtype} layout={layout} blocks={blocks} aligned"] = w4_ptx(dtype, layout, True, False, blocks, 1)
        w4_cases[f"{dtype} layout={layout} split-K GEMV"] = w4_ptx(dtype, layout, True, False, (1, 32, 128), 3)
        w4_cases[f"{dtype} layout={layout} straddling groups"] = w4_ptx(dtype, layout, False, False, (16, 64, 64), 1)
    w4_cases[f"{dtype} act-order GEMV"] = w4_ptx(dtype, 0, False, True, (1, 32, 128), 1)
    w4_cases[f"{dtype} act-order"] = w4_ptx(dtype, 0, False, True, (128, 128, 64), 1)
print(json.dumps({
    "nf4_fma": {k: len(re.findall(r"\bfma\.rn\.f32", v)) for k, v in nf4_ptxs.items()},
    "nf4_wide_stores": len(re.findall(r"st\.global\.v4\.b32", nf4_ptxs["*bf16 nested=True"])),
    # tensor-core instructions per tile: wgmma for 64+ rows, mma.sync below (the GEMV has no dot)
    "w4a16_mma": {k: [len(re.findall(r"wgmma\.mma_async", v)), len(re.findall(r"\bmma\.sync", v))]
                  for k, v in w4_cases.items() if "(1, " not in k and "GEMV" not in k},
    "w4a16_compiled": len(w4_cases),
    "nf4_gemm_mma": {k: len(re.findall(r"wgmma\.mma_async|\bmma\.sync", v)) for k, v in nf4_gemms.items()},
    "nf4_gemm_fma": {k: len(re.findall(r"\bfma\.rn\.f32", v)) for k, v in nf4_gemms.items()},
}))
"""


@pytest.mark.skipif(not nf4.HAS_TRITON, reason="triton is not installed (pip install triton)")
@pytest.mark.skipif(CUDA, reason="with a GPU the tests above run the compiled kernels themselves")
def test_kernels_compile_for_sm90():
    """Ahead-of-time compile for an H100 with Triton's bundled ptxas (no GPU needed), in a fresh process
    since this one may define the kernels for the interpreter."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SM90_CHECK], capture_output=True, text=True, env=env, timeout=900)
    if run.returncode and "ImportError" in run.stderr and "triton" in run.stderr:
        pytest.skip(f"this triton has no ahead-of-time compile API: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # bitsandbytes rounds code2[q] * absmax2 before adding the offset: a fused multiply-add would not
    assert set(result["nf4_fma"].values()) == {0}, result["nf4_fma"]
    assert result["nf4_wide_stores"] > 0, "NF4 output stores are not 16 bytes wide"
    assert result["w4a16_compiled"] == 2 * (3 * 6 + 2)
    wide = {k: wgmma for k, (wgmma, _) in result["w4a16_mma"].items() if "(16, " not in k and "straddling" not in k}
    assert all(n > 0 for n in wide.values()), f"W4A16 tiles of 64+ rows without Hopper's wgmma: {wide}"
    assert all(w + m > 0 for w, m in result["w4a16_mma"].values()), f"W4A16 tiles without tensor cores: {result['w4a16_mma']}"
    assert len(result["nf4_gemm_mma"]) == 2 * 3 * 2 * 3  # every tile shape _blocks picks
    # fp32 runs its dot in full precision (IEEE, no tensor cores, as F.linear in float32 does)
    assert all(n > 0 for k, n in result["nf4_gemm_mma"].items() if "fp32" not in k), result["nf4_gemm_mma"]
    # the tile's absmax is rounded before its offset is added, as bitsandbytes does (the fp32 dot's own FMAs aside)
    assert all(n == 0 for k, n in result["nf4_gemm_fma"].items() if "fp32" not in k), result["nf4_gemm_fma"]
