"""8-bit weights and per-token 8-bit activations (qtune.quant.w8a8), and SmoothQuant on a decoder block
(qtune.layerwise.smooth_block)."""

from __future__ import annotations

import pytest
import torch

from qtune import layerwise
from qtune.quant.rtn import rtn_quantize
from qtune.quant.w8a8 import FP8_DTYPE, FP8_MAX, fp8_gptq_channels, fp8_quantize_channels, int8_channels, quantize_tokens, smoothing_scales
from support import tiny_model


def test_int8_tokens_sit_on_a_per_token_grid():
    x = torch.randn(4, 7, 96) * torch.tensor([0.01, 1.0, 30.0, 0.0]).view(4, 1, 1)
    q = quantize_tokens(x, "int8")
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    live = scale.squeeze(-1) > 0
    steps = q[live] / scale[live]
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 127.001
    assert torch.all((q[live] - x[live]).abs() <= scale[live] / 2 * 1.0001)
    assert torch.equal(q[~live], torch.zeros_like(q[~live]))  # a zero token stays zero
    assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)  # the largest value is on the grid


def test_fp8_tokens_and_weights_hold_e4m3_values():
    x = torch.randn(5, 64) * 3
    q = quantize_tokens(x, "fp8")
    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    coded = q / scale
    assert torch.allclose(coded.to(FP8_DTYPE).float(), coded, rtol=1e-5)
    assert torch.all((q - x).abs() <= x.abs() * 2**-4 + scale * 2**-9)  # 3 mantissa bits; subnormals near 0
    w = torch.randn(12, 64) / 20
    fp8 = fp8_quantize_channels(w, torch.bfloat16)
    assert fp8.values.dtype == FP8_DTYPE and torch.equal(fp8.scales.to(torch.bfloat16).float(), fp8.scales)
    assert torch.all(fp8.values.float().abs().amax(dim=1) >= 416)  # the row maximum near the top of the range
    assert torch.all((fp8.dequantize() - w).abs() <= w.abs() * 2**-4 + fp8.scales.unsqueeze(1) * 2**-9 + 1e-3 * w.abs())
    with pytest.raises(ValueError, match="int8"):
        quantize_tokens(x, "int4")


def test_int8_channels_are_the_symmetric_8bit_grid():
    w = torch.randn(10, 48)
    grid = rtn_quantize(w, 8, -1, sym=True)
    channels = int8_channels(grid.qweight_int, grid.scales)
    assert channels.values.dtype == torch.int8
    assert torch.equal(channels.dequantize(), grid.dequantize())


def test_smoothing_scales_follow_the_published_formula():
    activations = torch.tensor([4.0, 1.0, 0.0, 9.0])
    weights = [torch.tensor([[1.0, -2.0, 1.0, 0.0], [0.5, 1.0, 3.0, 0.0]]), torch.tensor([[-2.0, 0.5, 0.0, 0.0]])]
    s = smoothing_scales(activations, weights, 0.5)
    assert torch.allclose(s[:2], torch.tensor([(4 / 2) ** 0.5, (1 / 2) ** 0.5]))
    assert s[2] == 1 and s[3] == 1  # a channel that never fires, and one no weight reads
    assert torch.allclose(smoothing_scales(activations, weights, 1.0)[:2], activations[:2])
    with pytest.raises(ValueError, match="strength"):
        smoothing_scales(activations, weights, 1.5)


def test_smoothing_tames_outlier_channels_for_int8_activations():
    """The reason for SmoothQuant: with a few outlier channels, per-token int8 activations lose the small
    channels; migrating the outliers into the weights cuts the output error."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g)
    x[:, :4] *= 60
    w = torch.randn(64, 128, generator=g) / 10
    reference = x @ w.t()

    def error(x: torch.Tensor, w: torch.Tensor) -> float:
        grid = rtn_quantize(w, 8, -1, sym=True)
        return float((quantize_tokens(x, "int8") @ grid.dequantize().t() - reference).pow(2).mean())

    s = smoothing_scales(x.abs().amax(dim=0), [w], 0.5)
    assert error(x / s, w * s) < error(x, w) / 4


@pytest.mark.parametrize("model_type,kv_heads", [("llama", 4), ("llama", 2), ("gemma2", 4), ("phi3", 4)])
def test_smooth_block_keeps_the_block_and_balances_each_group(model_type, kv_heads):
    """After smoothing (α = 0.5) the block computes what it did, and in each group of linears sharing an
    input (after a norm, or after v or up), every input channel's largest activation equals its largest
    weight (a / s = w * s); with grouped-query attention o is left as it was."""
    tokens = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}  # Phi-3's defaults lie outside a tiny vocabulary
    model = tiny_model(model_type, num_hidden_layers=1, num_key_value_heads=kv_heads, **tokens).eval()
    arch, layers = layerwise.quantizable_layers(model)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    batches = layerwise.capture_block_inputs(model, ids, None, 3, torch.device("cpu"))
    layer = layers[0]
    with torch.no_grad():
        before = layerwise._first_output(layer(batches[0].hidden, **batches[0].layer_kwargs[0])).clone()
    stats = layerwise.smooth_block(layer, 0, batches, arch=arch, strength=0.5)
    inputs = tuple(dict.fromkeys(arch.input_of(g.linears[0]) for g in arch.balance_groups))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in inputs}
    with layerwise._input_hooks(layer, inputs, lambda n, x: seen[n].append(x), False), torch.no_grad():
        outputs = [layerwise._first_output(layer(batch.hidden, **batch.layer_kwargs[0])) for batch in batches]
    assert torch.allclose(outputs[0], before, rtol=1e-4, atol=1e-5)
    smoothed = {g.previous for g in arch.balance_groups}
    if kv_heads != 4:
        smoothed.discard("self_attn.v_proj")
    assert {v["smoothed_by"] for v in stats.values()} == smoothed
    for group in arch.balance_groups:
        if group.previous not in smoothed:
            assert not any(name.endswith(group.linears[0]) for name in stats)
            continue
        a_max = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[arch.input_of(group.linears[0])]]).abs().amax(dim=0)
        w_max = torch.stack([layer.get_submodule(n).weight.abs().amax(dim=0) for n in group.linears]).amax(dim=0)
        assert torch.allclose(a_max, w_max, rtol=1e-3), group.previous


def test_gptq_onto_the_fp8_grid_beats_rounding_to_nearest():
    """The same scales as round-to-nearest FP8, values still FP8, and a smaller output error on the
    calibration inputs (correlated, as layer inputs are)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 96, generator=g) + 0.1 * torch.randn(512, 96, generator=g)
    w = torch.randn(32, 96, generator=g) / 10
    rtn = fp8_quantize_channels(w, torch.float16)
    gptq, loss = fp8_gptq_channels(w, 2 * x.t() @ x / x.shape[0], torch.float16)
    assert gptq.values.dtype == FP8_DTYPE and torch.equal(gptq.scales, rtn.scales) and loss > 0
    assert torch.equal((gptq.dequantize() / gptq.scales.unsqueeze(1)).to(FP8_DTYPE).float(), gptq.values.float())

    def error(q: torch.Tensor) -> float:
        return float((x @ (q - w).t()).pow(2).mean())

    assert error(gptq.dequantize()) < error(rtn.dequantize()) / 2
