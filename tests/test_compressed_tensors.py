"""compressed-tensors W4A16 exports (qtune.formats.compressed_tensors): the published pack-quantized layout,
the same GPTQ rounding as a GPTQ export, and transformers with the compressed-tensors package reading the
same weights back, bit for bit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oracles import REPO, needs, vllm_python
from qtune.exports import export
from qtune.formats import compressed_tensors as ct
from qtune.formats.gptq import read_quantization_config
from qtune.quant.rtn import QuantizedWeight, default_g_idx
from qtune.recipe import ExportTarget
from qtune.shards import CheckpointReader
from qtune.w4a16_models import load_w4a16_model
from support import QUICKSTART_DATA, tiny_model_dir

CALIBRATION = {"calibration": str(QUICKSTART_DATA / "quickstart_train.jsonl"), "samples": 8, "seq_len": 128}


def random_layer(n: int, k: int, group_size: int, sym: bool, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    zeros = torch.full((groups, n), 8, dtype=torch.int32) if sym else torch.randint(0, 16, (groups, n), generator=g, dtype=torch.int32)
    return QuantizedWeight(
        qweight_int=torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
        scales=torch.rand(groups, n, generator=g) / 50 + 1e-3,
        zeros=zeros,
        g_idx=default_g_idx(k, group_size),
        bits=4,
        group_size=group_size,
        sym=sym,
    )


@pytest.mark.parametrize("group_size,sym", [(32, True), (32, False), (64, False), (128, True), (-1, False)])
def test_the_packed_tensors_follow_the_published_layout(group_size, sym):
    """Nibble i of weight_packed[n, j] is the code of input 8j+i; nibble n%8 of weight_zero_point[n/8, g]
    is output n's zero in group g; scales are [N, G] in the model's dtype; weight_shape is (N, K)."""
    n, k = 24, 256
    layer = random_layer(n, k, group_size, sym)
    packed = ct.pack_ct_layer(layer, torch.float16)
    words = packed["weight_packed"].to(torch.int64) & 0xFFFFFFFF
    assert packed["weight_packed"].dtype == torch.int32 and words.shape == (n, k // 8)
    for i in range(8):
        assert torch.equal((words >> (4 * i)) & 15, layer.qweight_int[:, i::8].to(torch.int64))
    assert packed["weight_scale"].dtype == torch.float16 and torch.equal(packed["weight_scale"], layer.scales.t().half())
    assert packed["weight_scale"].stride() == (packed["weight_scale"].shape[1], 1)
    assert packed["weight_shape"].tolist() == [n, k] and packed["weight_shape"].dtype == torch.int64
    if sym:
        assert "weight_zero_point" not in packed
    else:
        zero_words = packed["weight_zero_point"].to(torch.int64) & 0xFFFFFFFF
        assert zero_words.shape == (n // 8, layer.zeros.shape[0])
        for row in range(n):
            assert torch.equal((zero_words[row // 8] >> (4 * (row % 8))) & 15, layer.zeros[:, row].to(torch.int64))
    back = ct.unpack_ct_layer(packed, 4, group_size, sym)
    assert torch.equal(back.qweight_int, layer.qweight_int) and torch.equal(back.zeros, layer.zeros)
    stored = QuantizedWeight(layer.qweight_int, layer.scales.half().float(), layer.zeros, layer.g_idx, 4, group_size, sym)
    assert torch.equal(back.dequantize(), stored.dequantize())


def test_what_the_layout_cannot_hold_is_refused():
    layer = random_layer(8, 64, 32, sym=False)
    permuted = QuantizedWeight(layer.qweight_int, layer.scales, layer.zeros, layer.g_idx.flip(0), 4, 32, False)
    with pytest.raises(ValueError, match="act-order"):
        ct.pack_ct_layer(permuted, torch.float16)
    with pytest.raises(ValueError, match="symmetric grid"):
        ct.pack_ct_layer(QuantizedWeight(layer.qweight_int, layer.scales, layer.zeros, layer.g_idx, 4, 32, True), torch.float16)
    with pytest.raises(ValueError, match="bits"):
        ct.ct_quantization_config(3, 32, True)
    assert ExportTarget(format="compressed-tensors", bits=8).problems()[0][0] == "bits"
    assert ExportTarget(format="compressed-tensors", act_order=True).problems()[0][0] == "act_order"
    assert ExportTarget(format="compressed-tensors", group_size=32, sym=False).default_name() == "ct-w4a16-g32-asym"
    assert ExportTarget(format="compressed-tensors", group_size=-1).default_name() == "ct-w4a16-channel"
    for group_size, sym in ((32, True), (128, False), (-1, False)):
        assert ct.read_ct_settings(ct.ct_quantization_config(4, group_size, sym)) == (4, group_size, sym)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("ct") / "llama", hidden=128)


def test_the_same_gptq_rounding_as_a_gptq_export(base: Path, tmp_path: Path):
    """An asymmetric compressed-tensors export holds the weights of the GPTQ export with the same settings."""
    settings = dict(group_size=32, sym=False, **CALIBRATION)
    gptq = export(base, ExportTarget(format="gptq", **settings), tmp_path / "gptq")
    compressed = export(base, ExportTarget(format="compressed-tensors", **settings), tmp_path / "ct")
    assert compressed.report["runtimes"][2] == {"runtime": "vLLM", "loads": True, "note": "", "proved_by": "tests/test_vllm.py"}
    ours, theirs = load_w4a16_model(compressed.path, device="cpu"), load_w4a16_model(gptq.path, device="cpu")
    linears = [name for name, _ in ours.named_modules() if name.endswith("_proj")]
    assert len(linears) == 14
    for name in linears:
        assert torch.equal(ours.get_submodule(name).weight, theirs.get_submodule(name).weight), name
    config = read_quantization_config(compressed.path)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"


@needs(vllm_python(), "transformers with compressed-tensors (vLLM's venv, .cache/vllm-venv)")
@pytest.mark.parametrize("group_size,sym", [(32, True), (64, False), (128, False), (-1, False)])
def test_transformers_with_compressed_tensors_reads_the_same_weights(base: Path, tmp_path: Path, group_size, sym):
    """transformers + compressed-tensors (in vLLM's venv) decompress every linear to our dequantized weights,
    bit for bit, in the checkpoint's dtype."""
    out = export(base, ExportTarget(format="compressed-tensors", group_size=group_size, sym=sym, **CALIBRATION), tmp_path / "ct").path
    dense = tmp_path / "dense.safetensors"
    done = subprocess.run([str(vllm_python()), str(REPO / "scripts" / "ct_dequantize.py"), str(out), str(dense)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = load_file(dense)
    reader = CheckpointReader(out)
    bits, size, symmetric = ct.read_ct_settings(read_quantization_config(out))
    assert len(theirs) == 14
    for key, weight in theirs.items():
        prefix = key.removesuffix(".weight")
        layer = {s: reader.get(f"{prefix}.{s}") for s in ct.PACKED_SUFFIXES if f"{prefix}.{s}" in reader}
        assert torch.equal(ct.unpack_ct_layer(layer, bits, size, symmetric).dequantize().to(weight.dtype), weight), key
