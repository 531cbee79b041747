"""compressed-tensors exports (qtune.formats.compressed_tensors): W4A16's published pack-quantized layout
with the same GPTQ rounding as a GPTQ export; W8A8's and FP8's 8-bit layouts, scored with their activations
rounded per token; transformers with the compressed-tensors package reading every scheme back, bit for bit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from oracles import REPO, needs, vllm_python
from qtune.exports import export
from qtune.formats import compressed_tensors as ct
from qtune.formats.gptq import read_quantization_config, unpack_rows
from qtune.quant.rtn import QuantizedWeight, default_g_idx
from qtune.quant.w8a8 import ChannelWeight
from qtune.quantized_models import QuantLinearW8A8, load_quantized_model, runtime_name
from qtune.recipe import ExportTarget
from qtune.shards import CheckpointReader
from support import QUICKSTART_DATA, tiny_model_dir
from test_fuzz_inputs import assert_refused, run_cli

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
    ours, theirs = load_quantized_model(compressed.path, device="cpu"), load_quantized_model(gptq.path, device="cpu")
    linears = [name for name, _ in ours.named_modules() if name.endswith("_proj")]
    assert len(linears) == 14
    for name in linears:
        assert torch.equal(ours.get_submodule(name).weight, theirs.get_submodule(name).weight), name
    config = read_quantization_config(compressed.path)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"


def test_the_awq_grid_of_an_awq_export(base: Path, tmp_path: Path):
    """method: awq holds the weights of the AWQ export with the same settings (scales searched, clipped, then
    rounded), in compressed-tensors' layout."""
    settings = dict(group_size=32, rounding="gptq", **CALIBRATION)
    target = ExportTarget(format="compressed-tensors", method="awq", **settings)
    assert (target.sym, target.problems(), target.default_name()) == (False, [], "ct-w4a16-g32-asym-awq-gptq")
    assert ExportTarget(format="compressed-tensors", method="awq", group_size=32).default_name() == "ct-w4a16-g32-asym-awq"
    awq = export(base, ExportTarget(format="awq", **settings), tmp_path / "awq")
    compressed = export(base, target, tmp_path / "ct")
    ours, theirs = load_quantized_model(compressed.path, device="cpu"), load_quantized_model(awq.path, device="cpu")
    names = [name for name, _ in ours.named_modules() if name.endswith("_proj") or name.endswith("layernorm")]
    assert len(names) == 14 + 4
    for name in names:
        assert torch.equal(ours.get_submodule(name).weight, theirs.get_submodule(name).weight), name
    problems = lambda **kw: [field for field, _ in ExportTarget(format="compressed-tensors", **kw).problems()]  # noqa: E731
    assert problems(method="awq", sym=True) == ["sym"]
    assert problems(method="awq", group_size=-1) == ["group_size"]
    assert problems(method="awq", scheme="W8A8") == ["method"]
    assert problems(rounding="gptq") == ["rounding"]
    assert [f for f, _ in ExportTarget(format="gptq", method="awq").problems()] == ["method"]


DECOMPRESSED = [  # one export per scheme and grid, all read by transformers in one process
    {"group_size": 32},
    {"group_size": 64, "sym": False},
    {"group_size": 128, "sym": False},
    {"group_size": -1, "sym": False},
    {"group_size": 64, "method": "awq"},
    {"scheme": "W8A8"},
    {"scheme": "FP8"},
    {"scheme": "FP8", "smoothing": 0.5},
]


def _ct_name(settings: dict) -> str:
    return ExportTarget(format="compressed-tensors", **settings).default_name()


@pytest.fixture(scope="module")
def decompressed(base: Path, tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """Each DECOMPRESSED export and the weights transformers + compressed-tensors (vLLM's venv) decompress it to."""
    work = tmp_path_factory.mktemp("decompressed")
    exports = {_ct_name(s): export(base, ExportTarget(format="compressed-tensors", **s, **CALIBRATION), work / _ct_name(s)).path for s in DECOMPRESSED}
    pairs = [str(arg) for name, path in exports.items() for arg in (path, work / f"{name}.safetensors")]
    done = subprocess.run([str(vllm_python()), str(REPO / "scripts" / "ct_dequantize.py"), *pairs], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: (path, load_file(work / f"{name}.safetensors")) for name, path in exports.items()}


@needs(vllm_python(), "transformers with compressed-tensors (vLLM's venv, .cache/vllm-venv)")
@pytest.mark.parametrize("name", [_ct_name(s) for s in DECOMPRESSED])
def test_transformers_with_compressed_tensors_reads_the_same_weights(decompressed, name: str):
    """transformers + compressed-tensors decompress every linear to our dequantized weights, bit for bit, in
    the checkpoint's dtype: every scheme's layout, read by the format's own package."""
    out, theirs = decompressed[name]
    reader = CheckpointReader(out)
    quantization = read_quantization_config(out)
    assert len(theirs) == 14
    for key, weight in theirs.items():
        prefix = key.removesuffix(".weight")
        if ct.ct_scheme(quantization) == "W4A16":
            layer = {s: reader.get(f"{prefix}.{s}") for s in ct.PACKED_SUFFIXES if f"{prefix}.{s}" in reader}
            ours = ct.unpack_ct_layer(layer, *ct.read_ct_settings(quantization)).dequantize()
        else:
            ours = ct.unpack_ct_channel_layer({s: reader.get(f"{prefix}.{s}") for s in ct.CHANNEL_SUFFIXES}).dequantize()
        assert torch.equal(ours.to(weight.dtype), weight), key


def test_the_8bit_layouts(base: Path):
    """W8A8 and FP8: int8 / float8_e4m3fn weights [N, K] and one scale per output [N, 1] in the model's dtype;
    the config asks the runtime for dynamic per-token activations of the same type."""
    q = ChannelWeight(torch.randint(-128, 128, (6, 32), dtype=torch.int8), torch.rand(6).half().float())
    packed = ct.pack_ct_channel_layer(q, "W8A8", torch.float16)
    assert packed["weight"].dtype == torch.int8 and packed["weight_scale"].shape == (6, 1) and packed["weight_scale"].dtype == torch.float16
    assert torch.equal(ct.unpack_ct_channel_layer(packed).dequantize(), q.dequantize())
    assert {k: (d, s) for k, (d, s) in ct.ct_channel_shapes(6, 32, "W8A8", torch.float16).items()} == {k: (v.dtype, tuple(v.shape)) for k, v in packed.items()}
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        ct.pack_ct_channel_layer(q, "FP8", torch.float16)
    with pytest.raises(ValueError, match="not exact"):
        ct.pack_ct_channel_layer(ChannelWeight(q.values, torch.full((6,), 1 / 3)), "W8A8", torch.float16)
    for scheme, kind, fmt in (("W8A8", "int", "int-quantized"), ("FP8", "float", "float-quantized")):
        config = ct.ct_channel_quantization_config(scheme)
        group = config["config_groups"]["group_0"]
        assert config["format"] == fmt and group["weights"]["type"] == kind and group["weights"]["strategy"] == "channel"
        assert group["input_activations"] | {} == {**group["weights"], "strategy": "token", "dynamic": True, "observer": None}
        assert ct.ct_scheme(config) == scheme
    assert ct.ct_scheme(ct.ct_quantization_config(4, 32, True)) == "W4A16"
    grouped = ct.ct_channel_quantization_config("W8A8")
    grouped["config_groups"]["group_0"]["weights"]["strategy"] = "group"
    with pytest.raises(ValueError, match="per-channel"):
        ct.ct_scheme(grouped)
    with pytest.raises(ValueError, match="marlin-24"):
        ct.ct_scheme({"format": "marlin-24"})


def test_the_8bit_schemes_settings():
    w8a8 = ExportTarget(format="compressed-tensors", scheme="W8A8")
    assert (w8a8.bits, w8a8.group_size, w8a8.smoothing_strength, w8a8.problems()) == (8, -1, 0.5, [])
    assert w8a8.default_name() == "ct-w8a8"
    assert ExportTarget(format="compressed-tensors", scheme="W8A8", smoothing=0.8).default_name() == "ct-w8a8-sq0.8"
    fp8 = ExportTarget(format="compressed-tensors", scheme="FP8")
    assert (fp8.smoothing_strength, fp8.default_name()) == (0.0, "ct-fp8")
    assert ExportTarget(format="compressed-tensors", scheme="FP8", smoothing=0.5).default_name() == "ct-fp8-sq0.5"
    problems = lambda **kw: [field for field, _ in ExportTarget(format="compressed-tensors", **kw).problems()]  # noqa: E731
    assert problems(scheme="W8A8", group_size=128) == ["group_size"]
    assert problems(scheme="W8A8", sym=False) == ["sym"]
    assert problems(scheme="FP8", bits=4) == ["bits"]
    assert problems(smoothing=0.5) == ["smoothing"]  # W4A16 keeps 16-bit activations
    assert [f for f, _ in ExportTarget(format="gptq", smoothing=0.5).problems()] == ["smoothing"]


@pytest.mark.parametrize("scheme", ["W8A8", "FP8"])
def test_an_8bit_export_scores_with_its_activations_rounded(base: Path, tmp_path: Path, scheme: str):
    """Every linear of the loaded export keeps its 8-bit weights and rounds its input per token; the model is
    close to the original, and not the same as the weights alone (the activation rounding is applied)."""
    out = export(base, ExportTarget(format="compressed-tensors", scheme=scheme, **CALIBRATION), tmp_path / "ct").path
    model = load_quantized_model(out, device="cpu")
    linears = [m for name, m in model.named_modules() if name.endswith("_proj")]
    assert len(linears) == 14 and all(isinstance(m, QuantLinearW8A8) for m in linears)
    assert runtime_name(model) == "qtune, 8-bit weights, activations rounded per token (float32)"  # the report's runtime column
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference(ids).logits.log_softmax(-1)
        ours = model(ids).logits.float().log_softmax(-1)
        x = torch.randn(3, linears[0].in_features)
        weights_only = torch.nn.functional.linear(x, linears[0].dequantize())
        assert not torch.equal(linears[0](x), weights_only)
        assert torch.allclose(linears[0](x), weights_only, rtol=0.1, atol=0.05 * float(weights_only.abs().max()))
    kl = float((theirs.exp() * (theirs - ours)).sum(-1).mean())
    assert 0 < kl < 1e-3, kl


def test_w8a8_holds_the_int8_gptq_rounding(base: Path, tmp_path: Path):
    """Without smoothing, W8A8's int8 weights are the codes of an 8-bit per-channel symmetric GPTQ export with
    the same calibration, minus 128; with smoothing the norms carry 1/s and the weights differ."""
    gptq = export(base, ExportTarget(format="gptq", bits=8, group_size=-1, **CALIBRATION), tmp_path / "gptq").path
    plain = export(base, ExportTarget(format="compressed-tensors", scheme="W8A8", smoothing=0, **CALIBRATION), tmp_path / "w8a8").path
    smoothed = export(base, ExportTarget(format="compressed-tensors", scheme="W8A8", **CALIBRATION), tmp_path / "sq").path
    codes, ours, sq, original = CheckpointReader(gptq), CheckpointReader(plain), CheckpointReader(smoothed), CheckpointReader(base)
    prefix = "model.layers.1.mlp.up_proj"
    gptq_codes = unpack_rows(codes.get(f"{prefix}.qweight"), 8).t()
    assert torch.equal(ours.get(f"{prefix}.weight").to(torch.int16), gptq_codes.to(torch.int16) - 128)
    assert torch.equal(ours.get("model.layers.1.post_attention_layernorm.weight"), original.get("model.layers.1.post_attention_layernorm.weight"))
    assert not torch.equal(sq.get("model.layers.1.post_attention_layernorm.weight"), original.get("model.layers.1.post_attention_layernorm.weight"))
    assert not torch.equal(sq.get(f"{prefix}.weight"), ours.get(f"{prefix}.weight"))


def test_the_cli_refuses_settings_a_scheme_cannot_hold(tmp_path: Path):
    for argv, named in (
        (["--scheme", "W8A8", "--group-size", "64"], "one weight scale per output channel"),
        (["--scheme", "FP8", "--asym"], "symmetric weights"),
        (["--smoothing", "0.5"], "SmoothQuant"),
        (["--scheme", "W8A8", "--smoothing", "1.5"], "smoothing"),
        (["--method", "awq", "--group-size", "-1"], "AWQ's scale search needs a group size"),
    ):
        code, output = run_cli("export", str(tmp_path), "--format", "compressed-tensors", *argv)
        assert_refused(code, output, named)
    code, output = run_cli("export", str(tmp_path), "--format", "compressed-tensors", "--method", "awq", "--group-size", "32")
    assert "asymmetric" not in output and "checkpoint" in output, output  # AWQ's grid needs no --asym; the empty source is what is refused
