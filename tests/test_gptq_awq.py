"""GPTQ / AWQ math, the layer-wise driver and the checkpoint formats, on tiny random models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM

import qtune.formats.gptq as gptq_format
import support
from qtune.formats.awq import (
    dequantize_awq_checkpoint,
    load_dequantized_awq_model,
    pack_awq_columns,
    unpack_awq_columns,
    write_awq_checkpoint,
)
from qtune.formats.gptq import (
    dequantize_gptq_checkpoint,
    load_dequantized_gptq_model,
    pack_gptq_layer,
    pack_rows,
    unpack_gptq_layer,
    unpack_rows,
    write_gptq_checkpoint,
)
from qtune.layerwise import capture_block_inputs, quantize_model_awq, quantize_model_gptq
from qtune.quant.awq import activation_mean, apply_clip, awq_fake_quantize, search_clip, search_scales
from qtune.quant.gptq import HessianAccumulator, gptq_quantize, group_aware_order
from qtune.quant.rtn import awq_grid, gptq_grid, rtn_fake_quantize, rtn_quantize

torch.set_num_threads(1)

TINY = support.TINY_CONFIG


def tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    return support.tiny_model("llama", seed, **overrides)


_PHI3_TOKENS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}  # its defaults (32000) lie outside a tiny vocabulary
TINY_ARCHS = {
    # (model_type, config overrides, the op AWQ folds o_proj's scales into or None, and down_proj's)
    "llama": ("llama", {"num_key_value_heads": 4}, "self_attn.v_proj", "mlp.up_proj"),  # MHA: v->o folding applies
    "mistral": ("mistral", {"sliding_window": 8}, None, "mlp.up_proj"),
    "qwen2": ("qwen2", {}, None, "mlp.up_proj"),  # q/k/v biases
    "qwen3": ("qwen3", {"head_dim": 24}, None, "mlp.up_proj"),  # q/k norms, heads x head_dim wider than hidden
    "phi3": ("phi3", {"num_key_value_heads": 4, **_PHI3_TOKENS}, "self_attn.qkv_proj", "mlp.gate_up_proj"),  # fused; v of qkv -> o
    "phi3-gqa": ("phi3", _PHI3_TOKENS, None, "mlp.gate_up_proj"),
    # norms scale by 1 + weight (AWQ folds into them with that offset); soft caps; every other layer sliding
    "gemma2": ("gemma2", {"num_key_value_heads": 4, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}, "self_attn.v_proj", "mlp.up_proj"),
    "gemma3": (
        "gemma3_text",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
        None,
        "mlp.up_proj",
    ),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``arch`` (TINY_ARCHS)."""
    model_type, overrides, _, _ = TINY_ARCHS[arch]
    return support.tiny_model(model_type, seed, **overrides)


def calibration(n: int = 8, seq: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (n, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding in one sample
    return ids, mask


def correlated_activations(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=generator) * 0.3 + torch.eye(k)
    x = torch.randn(tokens, k, generator=generator) @ mix
    x[:, : k // 16] *= 8.0  # a few outlier channels, as in real LLM activations
    return x


def mean_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    log_p, log_q = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


# ---------------------------------------------------------------- grids


def test_gptq_grid_conventions() -> None:
    w = torch.tensor([[0.5, 1.0, 1.5], [-2.0, -1.0, 3.0]])
    scale, zero = gptq_grid(w, 4, sym=False)
    assert torch.allclose(scale, torch.tensor([1.5 / 15, 5.0 / 15]), rtol=1e-3)  # min widened to 0 in row 0
    assert zero.tolist() == [0.0, 6.0]
    scale, zero = gptq_grid(w, 4, sym=True)
    assert zero.tolist() == [8.0, 8.0]
    assert torch.allclose(scale, torch.tensor([1.5 / 15, 6.0 / 15]), rtol=1e-3)
    scale, zero = awq_grid(w, 4)
    assert torch.allclose(scale, torch.tensor([1.0 / 15, 5.0 / 15]), rtol=1e-3)  # no widening to 0
    assert zero.tolist() == [0.0, 6.0]  # -round(0.5 / (1/15)) = -8 clamps to 0
    assert torch.equal(scale, scale.half().float())  # scales are float16-exact
    scale, zero = awq_grid(w, 4, sym=True)  # AutoAWQ zero_point=False: max|w| / 7, codes centred on 8
    assert torch.allclose(scale, torch.tensor([1.5 / 7, 3.0 / 7]), rtol=1e-3) and zero.tolist() == [8.0, 8.0]
    q = rtn_quantize(w, 4, -1, sym=False, convention="awq").dequantize()
    assert torch.allclose(q[1], w[1], atol=5.0 / 15 / 2)  # a row straddling 0 is covered
    # AutoAWQ's grid on an all-positive row: the zero clamps to 0 and the top saturates at 15 * scale
    assert torch.allclose(q[0], torch.tensor([0.5, 1.0, 1.0]), atol=0.05)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_codes_in_range_and_error_bounded(bits: int, group_size: int, sym: bool) -> None:
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(bits))
    q = rtn_quantize(w, bits, group_size, sym)
    assert int(q.qweight_int.min()) >= 0 and int(q.qweight_int.max()) < 2**bits
    assert q.scales.shape == (256 // (256 if group_size == -1 else group_size), 16)
    step = q.scales[q.g_idx.long()].t()
    # half a step, plus what rounding the scale to float16 costs at the clamped end of the grid
    assert ((q.dequantize() - w).abs() <= step * (0.5 + 2**bits * 2**-11) + 1e-6).all()


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_pack_unpack_bit_exact(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (64, 40), generator=torch.Generator().manual_seed(bits))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 40)
    assert torch.equal(unpack_rows(packed, bits), codes.to(torch.int32))


def test_gptq_pack_known_words() -> None:
    codes = torch.arange(8).unsqueeze(1)  # k = 0..7 in one column, nibble k holds k
    assert pack_rows(codes, 4).item() == 0x76543210
    assert pack_rows(torch.full((8, 1), 15), 4).item() == -1  # 0xFFFFFFFF as int32
    three = torch.zeros(32, 1, dtype=torch.int64)
    three[10] = 0b111  # straddles words 0 and 1 (bits 30..32)
    assert pack_rows(three, 3).flatten().tolist() == [-(2**31) + 2**30, 1, 0]


def test_awq_pack_interleave() -> None:
    codes = torch.arange(8).unsqueeze(0)  # column n holds n
    # nibble i holds column AWQ_ORDER[i] = 0,2,4,6,1,3,5,7
    assert pack_awq_columns(codes).item() == 0x75316420
    random_codes = torch.randint(0, 16, (24, 48), generator=torch.Generator().manual_seed(3))
    assert torch.equal(unpack_awq_columns(pack_awq_columns(random_codes)), random_codes.to(torch.int32))


# ---------------------------------------------------------------- GPTQ math


def test_hessian_accumulator_running_average_and_mask() -> None:
    x = torch.randn(3, 10, 16)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :4] = False
    acc = HessianAccumulator(16)
    acc.add_batch(x[:1], mask[:1])
    acc.add_batch(x[1:], mask[1:])
    flat = x[mask]
    assert acc.n_tokens == flat.shape[0]
    assert torch.allclose(acc.hessian, 2 * flat.t() @ flat / flat.shape[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last dim 16"):
        acc.add_batch(torch.randn(4, 8))


def test_gptq_beats_rtn_on_layer_output() -> None:
    x = correlated_activations(2048, 128)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(5)) * 0.05
    acc = HessianAccumulator(128)
    acc.add_batch(x)
    for sym in (True, False):
        result = gptq_quantize(w, acc.hessian, bits=4, group_size=32, sym=sym)
        gptq_err = float(((x @ (result.weight - w).t()) ** 2).mean())
        rtn_err = float(((x @ (rtn_fake_quantize(w, 4, 32, sym) - w).t()) ** 2).mean())
        assert gptq_err < 0.6 * rtn_err, (sym, gptq_err, rtn_err)
        assert result.damp == 0.01 and result.damp_retries == 0


def test_gptq_weight_is_dequantized_codes_and_blocking_invariant() -> None:
    x = correlated_activations(512, 96, seed=2)
    w = torch.randn(16, 96)
    h = 2 * x.t() @ x / x.shape[0]
    a = gptq_quantize(w, h, 4, 32, True, block_size=128)
    b = gptq_quantize(w, h, 4, 32, True, block_size=20)  # groups straddle lazy blocks
    assert torch.equal(a.weight, a.dequantize())
    assert (a.qweight_int != b.qweight_int).float().mean() < 0.01


def test_gptq_act_order_g_idx() -> None:
    x = correlated_activations(512, 64, seed=3)
    x = x[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]  # outliers scattered
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(32, 64)
    result = gptq_quantize(w, h, 4, 16, sym=True, act_order=True)
    assert not torch.equal(result.g_idx.long(), torch.arange(64) // 16)
    assert torch.bincount(result.g_idx.long()).tolist() == [16, 16, 16, 16]
    assert torch.equal(result.perm, torch.argsort(torch.diag(h), descending=True))
    tensors = pack_gptq_layer(result, "gptq")
    back = unpack_gptq_layer(tensors, 4, 16, True, "gptq")
    assert torch.equal(back.dequantize(), result.weight)


def test_group_aware_order_keeps_groups_and_solves_salient_first() -> None:
    diag = torch.tensor([1.0, 5.0, 2.0, 0.5, 9.0, 3.0, 7.0, 0.1, 4.0, 8.0])  # groups of 4, tail of 2
    perm, group_order = group_aware_order(diag, 4)
    assert group_order.tolist() == [1, 0]  # group 1 holds the largest entry (9)
    assert perm.tolist() == [4, 6, 5, 7, 1, 2, 0, 3, 8, 9]  # the partial tail stays last, in place


def test_gptq_group_aware_is_plain_layout_and_beats_natural_order() -> None:
    x = correlated_activations(1024, 128, seed=4)
    scale = torch.ones(128)
    scale[torch.randperm(128, generator=torch.Generator().manual_seed(1))[:6]] = 12.0  # scattered outlier channels
    x = x * scale
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    natural = gptq_quantize(w, h, 4, 32, sym=True)
    aware = gptq_quantize(w, h, 4, 32, sym=True, group_aware=True)
    assert torch.equal(aware.g_idx.long(), torch.arange(128) // 32)  # no act-order layout: loaders reorder nothing
    assert torch.equal(aware.weight, aware.dequantize())
    err = lambda r: float(((x @ (r.weight - w).t()) ** 2).mean())  # noqa: E731
    assert err(aware) < err(natural), (err(aware), err(natural))
    tensors = pack_gptq_layer(aware, "gptq")
    assert torch.equal(unpack_gptq_layer(tensors, 4, 32, True, "gptq").dequantize(), aware.weight)
    # with the diagonal already in processing order, group-aware changes nothing
    order = torch.argsort(torch.diag(h), descending=True)
    h_sorted, w_sorted = h[order][:, order], w[:, order]
    assert torch.equal(gptq_quantize(w_sorted, h_sorted, 4, 32, True, group_aware=True).qweight_int, gptq_quantize(w_sorted, h_sorted, 4, 32, True).qweight_int)


def test_gptq_dead_columns_and_partial_group() -> None:
    x = torch.randn(256, 40)
    x[:, 7] = 0.0
    h = 2 * x.t() @ x / 256
    w = torch.randn(8, 40)
    result = gptq_quantize(w, h, 4, 32, sym=False)
    assert result.dead_columns == 1
    assert torch.all(result.weight[:, 7] == 0)
    assert result.scales.shape == (2, 8)  # ceil(40 / 32): the last group holds 8 columns
    assert result.g_idx.tolist() == [0] * 32 + [1] * 8


def test_gptq_non_pd_hessian_raises_damping() -> None:
    k = 32
    v = torch.ones(k) / k**0.5
    h = torch.eye(k) - 1.5 * torch.outer(v, v)  # one eigenvalue of -0.5
    result = gptq_quantize(torch.randn(8, k), h, 4, 16, damp=0.01)
    assert result.damp_retries == 2 and result.damp == pytest.approx(1.0)
    assert torch.isfinite(result.weight).all()
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(torch.randn(8, k), -torch.eye(k), 4, 16)


def test_non_finite_weights_rejected() -> None:
    w = torch.randn(8, 32)
    w[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(w, torch.eye(32), 4, 16)
    with pytest.raises(ValueError, match="non-finite"):
        rtn_quantize(w, 4, 16)
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.*non-finite"):
        quantize_model_gptq(model, *calibration(2), group_size=32)


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(torch.randn(4, 32), bits=5)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(torch.randn(4, 32), torch.eye(16))
    with pytest.raises(ValueError, match="input_ids"):
        quantize_model_gptq(tiny_llama(), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        quantize_model_gptq(tiny_llama(), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="batch_size"):
        quantize_model_awq(tiny_llama(), *calibration(2), group_size=32, batch_size=0)


# ---------------------------------------------------------------- AWQ math


def test_awq_scale_search_beats_rtn() -> None:
    k, n, g = 128, 64, 32
    x = correlated_activations(1024, k, seed=4)
    held_out = correlated_activations(1024, k, seed=5)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6)) * 0.05
    reference = x @ w.t()

    def evaluate(candidates: list[torch.Tensor]) -> float:
        return float(((x @ candidates[0].t() - reference) ** 2).mean())

    search = search_scales(activation_mean(x), [w], evaluate, bits=4, group_size=g)
    assert search.error < 0.8 * search.rtn_error
    assert 0.0 <= search.ratio <= 1.0 and len(search.errors) == 20
    awq_w = awq_fake_quantize(w * search.scales, 4, g) / search.scales
    rtn_w = awq_fake_quantize(w, 4, g)
    awq_err = ((held_out @ (awq_w - w).t()) ** 2).mean()
    rtn_err = ((held_out @ (rtn_w - w).t()) ** 2).mean()
    assert awq_err < 0.8 * rtn_err


def test_awq_clip_search_never_hurts() -> None:
    x = correlated_activations(600, 64, seed=7)
    w = torch.randn(16, 64)
    w[0, 3] = 8.0  # one outlier weight makes its group's grid coarse
    max_val = search_clip(w, x, 4, 32)
    assert max_val.shape == (16, 2)
    clipped = apply_clip(w, max_val)
    clip_err = ((x @ (awq_fake_quantize(clipped, 4, 32) - w).t()) ** 2).mean()
    plain_err = ((x @ (awq_fake_quantize(w, 4, 32) - w).t()) ** 2).mean()
    assert clip_err <= plain_err
    assert (max_val <= w.float().abs().reshape(16, 2, 32).amax(-1) + 1e-6).all()


def test_awq_bad_group_size_rejected(tmp_path: Path) -> None:
    model = tiny_llama(hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj has K=96, group_size=64; try group_size=32"):
        quantize_model_awq(model, *calibration(2), group_size=64)
    # the GPTQ format takes the same model with a partial last group
    result = quantize_model_gptq(model, *calibration(2), group_size=64)
    write_gptq_checkpoint(model, result.quantized_layers, tmp_path / "gptq")
    state = dequantize_gptq_checkpoint(tmp_path / "gptq")
    layer = result.quantized_layers["model.layers.0.self_attn.q_proj"]
    assert layer.scales.shape[0] == 2
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], layer.dequantize())
    # and the AWQ writer refuses such a layer on its own too
    with pytest.raises(ValueError, match="K=96"):
        write_awq_checkpoint(model, result.quantized_layers, tmp_path / "awq")
    assert not (tmp_path / "awq").exists()


# ---------------------------------------------------------------- driver + formats


def _model_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "sym,act_order,bits,fmt",
    [(True, False, 4, "gptq"), (False, True, 4, "gptq_v2"), (True, True, 3, "gptq"), (False, False, 8, "gptq_v2")],
)
def test_gptq_checkpoint_round_trip(tmp_path: Path, sym: bool, act_order: bool, bits: int, fmt: str) -> None:
    model = tiny_llama()
    ids, mask = calibration()
    result = quantize_model_gptq(model, ids, mask, bits=bits, group_size=32, sym=sym, act_order=act_order)
    assert len(result.quantized_layers) == 14
    out = write_gptq_checkpoint(model, result.quantized_layers, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["checkpoint_format"] == fmt and config["format"] == fmt
    assert config["desc_act"] is act_order and config["sym"] is sym and config["bits"] == bits
    assert json.loads((out / "quantize_config.json").read_text()) == config
    state = dequantize_gptq_checkpoint(out)
    for name, quantized in result.quantized_layers.items():
        assert torch.equal(state[f"{name}.weight"], quantized.dequantize()), name  # bit for bit
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        q_proj = "model.layers.0.self_attn.q_proj"
        assert handle.get_tensor(f"{q_proj}.qweight").shape == (64 * bits // 32, 64)
        assert handle.get_tensor(f"{q_proj}.scales").dtype == torch.float16
        assert handle.get_tensor(f"{q_proj}.g_idx").dtype == torch.int32
        assert f"{q_proj}.weight" not in keys
        if fmt == "gptq" and bits == 4:
            qzeros = handle.get_tensor(f"{q_proj}.qzeros")
            assert (qzeros == 0x77777777).all()  # sym v1 fingerprint
    ours = load_dequantized_gptq_model(out)
    eval_ids = ids[1:3]
    assert torch.allclose(_model_logits(ours, eval_ids), _model_logits(model, eval_ids), atol=1e-5)


def test_gptq_v1_refuses_zero_point_zero() -> None:
    q = rtn_quantize(torch.rand(8, 32) + 0.1, 4, 16, sym=False)  # all-positive: zero = 0
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_gptq_layer(q, "gptq")
    back = unpack_gptq_layer(pack_gptq_layer(q, "gptq_v2"), 4, 16, False, "gptq_v2")
    assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_captured_block_inputs_replay_the_model(arch: str) -> None:
    model = tiny_model(arch)
    ids, mask = calibration(n=4, seq=20)
    batches = capture_block_inputs(model, ids, mask, batch_size=3, device=torch.device("cpu"))
    assert [b.hidden.shape[0] for b in batches] == [3, 1]
    assert "position_embeddings" in batches[0].layer_kwargs[0]
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        replayed = []
        for batch in batches:
            hidden = batch.hidden
            for index, layer in enumerate(model.model.layers):
                hidden = layer(hidden, **batch.layer_kwargs[index])
            replayed.append(model.model.norm(hidden))
    assert torch.allclose(torch.cat(replayed), expected, atol=1e-5)


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_gptq_8bit_keeps_the_model(arch: str) -> None:
    """Plumbing check: capture, kwargs, padding and sequential order lose nothing at 8 bits."""
    model = tiny_model(arch, seed=3)
    reference = copy.deepcopy(model)
    ids, mask = calibration()
    quantize_model_gptq(model, ids, mask, bits=8, group_size=32)
    # Gemma scales its embeddings by sqrt(hidden): 8-bit rounding alone costs it 3e-6 by RTN, 1.1e-6 by GPTQ
    limit = 3e-6 if arch.startswith("gemma") else 1e-6
    assert mean_kl(_model_logits(reference, ids), _model_logits(model, ids)) < limit


def test_gptq_model_error_below_rtn() -> None:
    model = tiny_llama(seed=4, initializer_range=0.1)
    reference = copy.deepcopy(model)
    rtn = copy.deepcopy(model)
    for module in rtn.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = rtn_fake_quantize(module.weight.data, 3, 32, True)
    ids, mask = calibration(n=16, seq=32)
    quantize_model_gptq(model, ids, mask, bits=3, group_size=32, act_order=True)
    ref = _model_logits(reference, ids)
    assert mean_kl(ref, _model_logits(model, ids)) < mean_kl(ref, _model_logits(rtn, ids))


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_awq_checkpoint_round_trip(tmp_path: Path, arch: str) -> None:
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    ids, mask = calibration()
    result = quantize_model_awq(model, ids, mask, group_size=32)
    o_stats = result.stats["model.layers.0.self_attn.o_proj"]
    _, _, o_scaled_by, down_scaled_by = TINY_ARCHS[arch]
    assert o_stats.get("scaled_by") == o_scaled_by
    assert result.stats["model.layers.0.mlp.down_proj"]["scaled_by"] == down_scaled_by
    out = write_awq_checkpoint(model, result.quantized_layers, tmp_path / "awq")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
        "bits": 4,
        "group_size": 32,
        "modules_to_not_convert": None,
    }
    state = dequantize_awq_checkpoint(out)
    for name, quantized in result.quantized_layers.items():
        assert torch.equal(state[f"{name}.weight"], quantized.dequantize()), name
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (128, 8)
        assert handle.get_tensor("model.layers.0.mlp.down_proj.scales").shape == (4, 64)
    ours = load_dequantized_awq_model(out)
    assert torch.allclose(_model_logits(ours, ids), _model_logits(model, ids), atol=1e-5)
    assert mean_kl(_model_logits(reference, ids), _model_logits(ours, ids)) < 1e-3


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2", "gemma3"])
def test_awq_8bit_folding_keeps_the_model(tmp_path: Path, arch: str) -> None:
    """Scales folded into norms and linears (for Phi-3, into the v rows of the fused qkv and the up rows
    of the fused gate_up) must leave the function unchanged (up to 8-bit rounding)."""
    model = tiny_model(arch, seed=5)
    reference = copy.deepcopy(model)
    ids, mask = calibration()
    result = quantize_model_awq(model, ids, mask, bits=8, group_size=32)
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, reference.model.layers[0].input_layernorm.weight)  # scales were folded in
    assert any(stats["awq_ratio"] > 0 for stats in result.stats.values() if "awq_ratio" in stats)
    _, _, o_scaled_by, down_scaled_by = TINY_ARCHS[arch]
    assert result.stats["model.layers.0.self_attn.o_proj"].get("scaled_by") == o_scaled_by
    assert result.stats["model.layers.0.mlp.down_proj"]["scaled_by"] == down_scaled_by
    assert mean_kl(_model_logits(reference, ids), _model_logits(model, ids)) < 1e-5
    with pytest.raises(ValueError, match="4-bit weights only"):
        write_awq_checkpoint(model, result.quantized_layers, tmp_path / "awq8")


def test_unsupported_model_rejected() -> None:
    class NoLayers(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="no model.layers"):
        quantize_model_gptq(NoLayers(), *calibration(2))
    model = tiny_llama()
    model.train()
    del model.model.layers[0].mlp.gate_proj
    with pytest.raises(ValueError, match="lacks nn.Linear modules \\['mlp.gate_proj'\\]"):
        quantize_model_awq(model, *calibration(2), group_size=32)
    assert model.training  # the caller's mode is restored


def test_awq_model_error_below_rtn() -> None:
    model = tiny_llama(seed=6, initializer_range=0.1)
    with torch.no_grad():  # outlier channels in the residual stream, as trained models have
        model.model.embed_tokens.weight[:, :4] *= 10.0
    reference = copy.deepcopy(model)
    rtn = copy.deepcopy(model)
    for module in rtn.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = rtn_fake_quantize(module.weight.data, 4, 32, False, "awq")
    ids, mask = calibration(n=16, seq=32)
    quantize_model_awq(model, ids, mask, group_size=32)
    ref = _model_logits(reference, ids)
    assert mean_kl(ref, _model_logits(model, ids)) < mean_kl(ref, _model_logits(rtn, ids))


def test_awq_with_gptq_rounding_beats_plain_awq_and_keeps_the_layout(tmp_path: Path) -> None:
    model = tiny_llama(seed=6, initializer_range=0.1)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :4] *= 10.0
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    ids, mask = calibration(n=16, seq=32)
    quantize_model_awq(plain, ids, mask, group_size=32)
    result = quantize_model_awq(model, ids, mask, group_size=32, rounding="gptq")
    ref = _model_logits(reference, ids)
    assert mean_kl(ref, _model_logits(model, ids)) < mean_kl(ref, _model_logits(plain, ids))
    out = write_awq_checkpoint(model, result.quantized_layers, tmp_path / "awq")
    state = dequantize_awq_checkpoint(out)
    for name, quantized in result.quantized_layers.items():
        assert torch.equal(state[f"{name}.weight"], quantized.dequantize()), name
    assert torch.allclose(_model_logits(load_dequantized_awq_model(out), ids), _model_logits(model, ids), atol=1e-5)
    with pytest.raises(ValueError, match="rounding must be"):
        quantize_model_awq(tiny_llama(), ids, mask, group_size=32, rounding="nearest")


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    result = quantize_model_gptq(model, *calibration(2), group_size=32)

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gptq_format, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_gptq_checkpoint(model, result.quantized_layers, tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        write_awq_checkpoint(model, result.quantized_layers, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_gptq_checkpoint(model, result.quantized_layers, tmp_path / "out")
    with pytest.raises(FileExistsError):
        write_gptq_checkpoint(model, result.quantized_layers, tmp_path / "out")
    write_gptq_checkpoint(model, result.quantized_layers, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def tiny_tokenizer():  # noqa: ANN201 - a transformers tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(TINY["vocab_size"] - 3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_writers_tokenizer_dtype_tied_embeddings_and_options(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = tiny_llama(seed=7, tie_word_embeddings=True)
    tokenizer = tiny_tokenizer()
    messages: list[str] = []
    gptq = quantize_model_gptq(model, *calibration(4), group_size=32, true_sequential=False, progress=messages.append)
    assert messages == ["gptq: layer 1/2 done", "gptq: layer 2/2 done"]
    out = write_gptq_checkpoint(model, gptq.quantized_layers, tmp_path / "gptq", tokenizer, checkpoint_format="gptq_v2", dtype=torch.float16)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert AutoTokenizer.from_pretrained(out)("w1 w5").input_ids == tokenizer("w1 w5").input_ids
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # tied: stored once
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.qzeros").eq(0x88888888 - 2**32).all()  # raw 8s
    ours = load_dequantized_gptq_model(out)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    ids = calibration(2)[0]
    assert mean_kl(_model_logits(model, ids), _model_logits(ours, ids)) < 1e-5  # only fp16 rounding of norms

    model = tiny_llama(seed=7, tie_word_embeddings=True)
    awq = quantize_model_awq(model, *calibration(4), group_size=32, apply_clip=False)
    assert not any(stats["clipped"] for stats in awq.stats.values())
    out = write_awq_checkpoint(model, awq.quantized_layers, tmp_path / "awq", tokenizer, modules_to_not_convert=["lm_head"])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    assert (out / "tokenizer.json").exists()
    assert torch.allclose(_model_logits(load_dequantized_awq_model(out), ids), _model_logits(model, ids), atol=1e-5)
