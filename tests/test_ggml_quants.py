"""qtune.quant.ggml_quants against ggml itself (llama-cpp-python's libggml-base) and gguf-py.

Every test runs twice: with the compiled CPU encoders (the default on CPU) and with the torch
encoders that other devices use (QTUNE_GGML_ENCODER=torch).

The ggml oracle needs llama-cpp-python, which PyPI ships only as an sdist: build and install it
with scripts/build_llama_cpp.sh. Without it those tests skip; the gguf-py and property tests run.
"""

from __future__ import annotations

import ctypes
import pathlib

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from oracles import libggml_base, require
from qtune.quant.ggml_quants import SUPPORTED_TYPES, block_size, dequantize, quantize, row_bytes, type_size

QUANT_TYPES = [t for t in SUPPORTED_TYPES if t not in (Q.F32, Q.F16, Q.BF16)]
K_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def encoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("QTUNE_GGML_ENCODER", request.param)
    return request.param


# ---------------------------------------------------------------- the ggml oracle (ctypes)


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class GGML:
    """ggml_quantize_chunk and the to_float traits of llama-cpp-python's libggml-base.so."""

    def __init__(self, path: pathlib.Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)

    def quantize(self, x: np.ndarray, qtype: Q, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        out = np.zeros((rows, row_bytes(qtype, n)), dtype=np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        written = self.lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n, None if qw is None else qw.ctypes.data)
        assert written == out.nbytes
        return out

    def dequantize(self, data: np.ndarray, qtype: Q, n_per_row: int) -> np.ndarray:
        data = np.ascontiguousarray(data)
        out = np.zeros((data.shape[0], n_per_row), dtype=np.float32)
        address = self.lib.ggml_get_type_traits(int(qtype)).contents.to_float
        if not address:  # F32 has no converter: its bytes are the values
            return data.view(np.float32).reshape(out.shape).copy()
        _TO_FLOAT(address)(data.ctypes.data, out.ctypes.data, out.size)
        return out


@pytest.fixture(scope="module")
def ggml() -> GGML:
    path = libggml_base()
    require(path, "llama-cpp-python's libggml-base.so")
    assert path is not None
    return GGML(path)


# ---------------------------------------------------------------- test data


def make_rows(n_per_row: int, seed: int = 0) -> np.ndarray:
    """Rows of varied distributions, float32 [rows, n_per_row]."""
    rng = np.random.default_rng(seed)
    n = n_per_row
    rows = []
    for scale in (1e-3, 0.02, 1.0, 300.0):
        rows.append(rng.standard_normal(n) * scale)
    rows.append(rng.laplace(size=n) * 0.05)
    outliers = rng.standard_normal(n) * 0.02
    outliers[rng.integers(0, n, size=max(1, n // 64))] *= 50
    rows.append(outliers)
    rows.append(np.zeros(n))
    rows.append(np.full(n, 0.37))
    rows.append(np.full(n, -1.5))
    rows.append(rng.uniform(0.0, 1.0, n))  # all positive
    rows.append(-rng.uniform(0.2, 1.0, n))  # all negative
    rows.append((rng.standard_normal(n) * 0.05).astype(np.float16).astype(np.float64))
    rows.append(rng.standard_normal(n) * 1e-7)  # scales fall into fp16 subnormals
    rows.append(rng.standard_normal(n) * 1e-30)  # everything below the group epsilon
    rows.append(np.round(rng.standard_normal(n) * 4) / 4)  # few distinct values: rounding ties
    rows.append(rng.integers(-8, 8, n) * 0.125)  # exactly on a Q4_0-like grid
    half_zero = rng.standard_normal(n)
    half_zero[: n // 2] = 0.0
    rows.append(half_zero)
    signed_zeros = rng.standard_normal(n) * 1e-9
    signed_zeros = signed_zeros.astype(np.float16).astype(np.float64)  # mixes 0.0 and -0.0
    rows.append(signed_zeros)
    sparse = np.where(rng.uniform(size=n) < 0.9, 0.0, rng.standard_normal(n))
    rows.append(sparse)
    rows.append(rng.standard_t(df=2, size=n) * 0.01)  # heavy tails
    rows.append(np.linspace(-1.0, 2.0, n))
    rows.append(rng.standard_normal(n) * 1e-40)  # float32 subnormals
    rows.append(rng.standard_normal(n) * 1e19)  # x*x overflows to inf
    return np.stack(rows).astype(np.float32)


def make_random_matrix(rows: int, n_per_row: int, seed: int) -> np.ndarray:
    """Rows drawn from a mixture of shapes and scales, like the weights of a fine-tuned model."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-4, 1, (rows, 1))
    kind = rng.integers(0, 4, (rows, 1))
    gauss = rng.standard_normal((rows, n_per_row))
    laplace = rng.laplace(size=(rows, n_per_row))
    student = rng.standard_t(df=3, size=(rows, n_per_row))
    shifted = rng.standard_normal((rows, n_per_row)) + rng.uniform(-2, 2, (rows, 1))
    x = np.select([kind == 0, kind == 1, kind == 2], [gauss, laplace, student], shifted) * scale
    return x.astype(np.float32)


def make_imatrix(n_per_row: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    qw = rng.lognormal(0.0, 1.5, n_per_row)
    qw[rng.integers(0, n_per_row, size=max(1, n_per_row // 50))] = 0.0  # unused columns
    return qw.astype(np.float32)


def _ours(x: np.ndarray, qtype: Q, imatrix: np.ndarray | None = None) -> np.ndarray:
    qw = None if imatrix is None else torch.from_numpy(imatrix)
    return quantize(torch.from_numpy(x), qtype, qw).numpy()


def _mismatch_report(ours: np.ndarray, ref: np.ndarray, qtype: Q) -> str:
    ts = type_size(qtype)
    ob, rb = ours.reshape(-1, ts), ref.reshape(-1, ts)
    bad_blocks = np.flatnonzero((ob != rb).any(axis=1))
    bad_rows = np.flatnonzero((ours != ref).any(axis=1))
    first = bad_blocks[0] if len(bad_blocks) else None
    detail = "" if first is None else f"; first bad block {first}: ours {ob[first][:24]} ref {rb[first][:24]}"
    return f"{qtype.name}: {len(bad_blocks)}/{len(ob)} blocks ({len(bad_blocks) / len(ob):.2%}) differ, rows {bad_rows.tolist()}{detail}"


# ---------------------------------------------------------------- byte equality with ggml


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_per_row", [256, 4096])
def test_bytes_match_ggml(ggml: GGML, qtype: Q, n_per_row: int) -> None:
    x = make_rows(n_per_row, seed=n_per_row)
    ref = ggml.quantize(x, qtype)
    ours = _ours(x, qtype)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), _mismatch_report(ours, ref, qtype)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_per_row", [256, 1024])
def test_bytes_match_ggml_with_imatrix(ggml: GGML, qtype: Q, n_per_row: int) -> None:
    x = make_rows(n_per_row, seed=n_per_row + 7)
    qw = make_imatrix(n_per_row)
    ref = ggml.quantize(x, qtype, qw)
    ours = _ours(x, qtype, qw)
    assert np.array_equal(ours, ref), _mismatch_report(ours, ref, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda t: t.name)
def test_bytes_match_ggml_rows_not_multiple_of_256(ggml: GGML, qtype: Q) -> None:
    x = make_rows(96, seed=3)
    assert np.array_equal(_ours(x, qtype), ggml.quantize(x, qtype))
    qw = make_imatrix(96)
    assert np.array_equal(_ours(x, qtype, qw), ggml.quantize(x, qtype, qw))


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_random_gaussian_matrix_matches_ggml(ggml: GGML, qtype: Q) -> None:
    """Many ordinary rows: a weight matrix of a merged model, with and without imatrix."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((64, 512)) * rng.uniform(0.005, 0.1, (64, 1))).astype(np.float32)
    assert np.array_equal(_ours(x, qtype), ggml.quantize(x, qtype)), qtype.name
    qw = make_imatrix(512, seed=5)
    ours, ref = _ours(x, qtype, qw), ggml.quantize(x, qtype, qw)
    assert np.array_equal(ours, ref), _mismatch_report(ours, ref, qtype)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_bulk_random_rows_match_ggml(ggml: GGML, qtype: Q) -> None:
    x = make_random_matrix(160, 1024, seed=int(qtype))
    qw = make_imatrix(1024, seed=int(qtype) + 100)
    for imatrix in (None, qw):
        ours, ref = _ours(x, qtype, imatrix), ggml.quantize(x, qtype, imatrix)
        assert np.array_equal(ours, ref), _mismatch_report(ours, ref, qtype)


def test_non_finite_inputs_give_ggml_bytes(ggml: GGML) -> None:
    """Garbage in, but the same garbage out: NaN/inf follow the C comparisons and casts."""
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    x[0, 5], x[1, 7], x[2, 9], x[3] = np.nan, np.inf, -np.inf, np.nan
    qw = make_imatrix(256)
    for qtype in SUPPORTED_TYPES:
        for imatrix in (None, qw):
            with np.errstate(all="ignore"):
                ours, ref = _ours(x, qtype, imatrix), ggml.quantize(x, qtype, imatrix)
            assert np.array_equal(ours, ref), _mismatch_report(ours, ref, qtype)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_ggml_to_float(ggml: GGML, qtype: Q) -> None:
    x = make_rows(512, seed=2)
    data = ggml.quantize(x, qtype)
    ref = ggml.dequantize(data, qtype, 512)
    ours = dequantize(torch.from_numpy(data), qtype, 512).numpy()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


# ---------------------------------------------------------------- without ggml


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
def test_gguf_py_dequantizes_our_bytes_to_our_values(qtype: Q, use_imatrix: bool) -> None:
    x = make_rows(512, seed=4)
    qw = make_imatrix(512) if use_imatrix else None
    data = _ours(x, qtype, qw)
    with np.errstate(all="ignore"):  # the 1e19 row decodes to inf/nan in gguf-py too
        theirs = gguf.quants.dequantize(data, qtype).reshape(x.shape).astype(np.float32)
    ours = dequantize(torch.from_numpy(data), qtype, 512).numpy()
    assert ours.dtype == np.float32 and ours.shape == x.shape
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("qtype", [Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda t: t.name)
def test_matches_gguf_py_quantize(qtype: Q) -> None:
    """gguf-py implements these reference quantizers too (it documents Q8_0 as bit-exact).

    Rows holding -0.0 are left out: there gguf-py's Q4_0..Q5_1 pick a different zero sign for
    d or m than ggml does (ours follow ggml, see test_bytes_match_ggml).
    """
    x = make_rows(512, seed=6)
    x = x[~(np.signbit(x) & (x == 0)).any(axis=1)]
    with np.errstate(all="ignore"):
        theirs = gguf.quants.quantize(x, qtype)
    assert np.array_equal(_ours(x, qtype), theirs)


def test_float_types_are_plain_conversions() -> None:
    x = torch.from_numpy(make_rows(256))
    assert torch.equal(quantize(x, Q.F32).view(torch.float32), x)
    assert torch.equal(quantize(x, Q.F16).view(torch.float16), x.half())
    assert torch.equal(dequantize(quantize(x, Q.BF16), Q.BF16, 256), x.bfloat16().float())
    nan = torch.tensor([[float("nan"), -float("nan"), 1.0, -2.0]])
    f16 = quantize(nan, Q.F16).view(torch.int16).to(torch.int32) & 0xFFFF
    assert f16.tolist() == [[0x7E00, 0xFE00, 0x3C00, 0xC000]]


def rmse_of(x: torch.Tensor, qtype: Q) -> float:
    return ((dequantize(quantize(x, qtype), qtype, x.shape[1]) - x) ** 2).mean().sqrt().item()


def test_error_ordering_on_gaussian_data() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.standard_normal((32, 1024)) * 0.02).astype(np.float32))
    order = [Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q3_K, Q.Q2_K]
    rmse = [((dequantize(quantize(x, t), t, 1024) - x) ** 2).mean().sqrt().item() for t in order]
    assert all(a < b for a, b in zip(rmse, rmse[1:])), dict(zip((t.name for t in order), rmse))
    assert rmse[-1] < 0.02 * 0.5  # even Q2_K keeps well under the signal's scale
    # the non-linear 4-bit grid beats the uniform one of the same size
    assert rmse_of(x, Q.IQ4_NL) < rmse_of(x, Q.Q4_0) and rmse_of(x, Q.IQ4_XS) < rmse_of(x, Q.Q3_K)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_imatrix_lowers_weighted_error(qtype: Q) -> None:
    if qtype == Q.Q8_0:
        pytest.skip("ggml ignores the imatrix for Q8_0")
    rng = np.random.default_rng(3)
    x = torch.from_numpy((rng.standard_normal((16, 512)) * 0.02).astype(np.float32))
    qw = torch.from_numpy(rng.lognormal(0.0, 2.0, 512).astype(np.float32))

    def weighted_err(q: torch.Tensor) -> float:
        return (((dequantize(q, qtype, 512) - x) ** 2) * qw).mean().item()

    assert weighted_err(quantize(x, qtype, qw)) < weighted_err(quantize(x, qtype))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_rejects_row_length_not_multiple_of_block(qtype: Q) -> None:
    bs = block_size(qtype)
    with pytest.raises(ValueError, match=rf"{qtype.name}.*blocks of {bs}"):
        quantize(torch.zeros(2, bs + 16), qtype)
    with pytest.raises(ValueError, match=rf"{qtype.name}.*blocks of {bs}"):
        dequantize(torch.zeros(2, 10, dtype=torch.uint8), qtype, bs + 16)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(256), Q.Q4_K)
    with pytest.raises(ValueError, match="imatrix"):
        quantize(torch.zeros(2, 256), Q.Q4_K, torch.ones(128))
    with pytest.raises(ValueError, match="not supported"):
        quantize(torch.zeros(2, 256), Q.Q8_K)
    with pytest.raises(ValueError, match=r"uint8 data \[rows, 144\]"):
        dequantize(torch.zeros(2, 143, dtype=torch.uint8), Q.Q4_K, 256)


def test_cpu_uses_the_compiled_encoder_by_default(encoder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import qtune.quant.ggml_cpu as ggml_cpu

    calls = []
    monkeypatch.setattr(ggml_cpu, "quantize_rows", lambda *args: calls.append(args[1]))
    quantize(torch.zeros(2, 256), Q.Q4_K)
    assert calls == ([Q.Q4_K] if encoder == "compiled" else [])
    monkeypatch.setenv("QTUNE_GGML_ENCODER", "fast")
    with pytest.raises(ValueError, match="QTUNE_GGML_ENCODER must be 'compiled' or 'torch'"):
        quantize(torch.zeros(2, 256), Q.Q4_K)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_chunking_does_not_change_bytes(qtype: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    import qtune.quant.ggml_quants as gq

    x = torch.from_numpy(make_rows(256, seed=9))
    qw = torch.from_numpy(make_imatrix(256))
    whole = quantize(x, qtype, qw)
    monkeypatch.setattr(gq, "CHUNK_VALUES", 256 * 3)
    assert torch.equal(quantize(x, qtype, qw), whole)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_cuda_gives_the_cpu_bytes(qtype: Q) -> None:
    x = torch.from_numpy(make_rows(512, seed=8))
    qw = torch.from_numpy(make_imatrix(512))
    for imatrix in (None, qw):
        cpu = quantize(x, qtype, imatrix)
        gpu = quantize(x.cuda(), qtype, None if imatrix is None else imatrix.cuda())
        assert torch.equal(gpu.cpu(), cpu)
        assert torch.equal(dequantize(gpu, qtype, 512).cpu(), dequantize(cpu, qtype, 512))


def test_thread_count_and_input_layout_do_not_change_bytes() -> None:
    x = torch.from_numpy(make_random_matrix(24, 512, seed=1))
    qw = torch.from_numpy(make_imatrix(512))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [quantize(x, t, qw) for t in QUANT_TYPES]
        torch.set_num_threads(2)
        two = [quantize(x, t, qw) for t in QUANT_TYPES]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    strided = torch.zeros(512, 48)[:, :24].copy_(x.t()).t()  # same values, non-contiguous
    assert not strided.is_contiguous()
    assert torch.equal(quantize(strided, Q.Q4_K, qw), one[QUANT_TYPES.index(Q.Q4_K)])
    # half-precision inputs are quantized from their exact float32 values
    xh = x.to(torch.bfloat16)
    assert torch.equal(quantize(xh, Q.Q6_K), quantize(xh.float(), Q.Q6_K))
