#!/usr/bin/env python3
"""Check and time qtune's kernels on a CUDA GPU; prints a table per section and a summary last.

    PYTHONPATH=device_deps python3 scripts/bench_kernels.py            # everything (about 5-8 min on an H100)
    PYTHONPATH=device_deps python3 scripts/bench_kernels.py --skip-train
    PYTHONPATH=device_deps python3 scripts/bench_kernels.py --pytest   # also run tests/test_kernels.py on the GPU
    python3 scripts/bench_kernels.py --smoke-cpu                        # tiny shapes on CPU (TRITON_INTERPRET=1):
                                                                        # checks this script, times nothing real

Sections: device copy bandwidth; NF4 dequant (Llama 7B/8B/70B layer shapes) vs bandwidth and
bitsandbytes; W4A16 GEMV/GEMM (GPTQ, GPTQ act-order, AWQ) at batch 1/16/128 vs the bandwidth floor and
dequantize-then-cuBLAS; a QLoRA training step on a random Llama-3-8B-shaped model, qtune fused vs plain
transformers+peft+bitsandbytes, alternating. Each kernel is checked against its reference first.
Without CUDA (and without --smoke-cpu) it prints "no CUDA device" and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke-cpu", action="store_true", help="run every section on CPU with tiny shapes")
    p.add_argument("--skip-nf4", action="store_true")
    p.add_argument("--skip-w4a16", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--pytest", action="store_true", help="run tests/test_kernels.py in this process first")
    p.add_argument("--train-layers", type=int, default=32, help="decoder layers of the Llama-3-8B-shaped model")
    p.add_argument("--train-steps", type=int, default=4, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--seq", type=int, default=2048)
    return p.parse_args()


def import_qtune_kernels():
    """qtune.kernels from an install, or straight from this checkout (the GPU machine has no install)."""
    try:
        import qtune.kernels  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))  # qtune/kernels links to kernels/, a namespace package of qtune
    from qtune.kernels import nf4, qlora_linear, w4a16

    return nf4, w4a16, qlora_linear


# ---------------------------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device: str):
        self.device = device

    def sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def median_ms(self, fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
        if self.device == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def rotating(fns):
    """One callable that runs the next of `fns` each call (inputs rotate so L2 does not hold them)."""
    state = {"i": 0}

    def run():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return run


def copies_needed(bytes_per_set: int, device: str) -> int:
    if device != "cuda":
        return 1
    import torch

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, math.ceil(4 * l2 / max(bytes_per_set, 1)))


def print_table(title: str, header: list[str], rows: list[list]):
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- sections


def bench_bandwidth(timer: Timer, device: str) -> float:
    import torch

    n = (1 << 30) if device == "cuda" else (1 << 22)
    src = torch.randn(n // 4, device=device)  # random, not zeros
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    gbps = 2 * n / ms / 1e6
    print_table("device copy bandwidth", ["bytes", "ms", "GB/s (read+write)"], [[n, ms, gbps]])
    return gbps


LLAMA_LAYER_SHAPES = {  # (out_features, in_features)
    "7B": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "8B": [(1024, 4096), (14336, 4096), (4096, 14336)],
    "70B": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
}


def random_nf4(shape, device, dtype, seed, blocksize=64):
    """Random packed bytes and double-quant state (a bitsandbytes QuantState when bitsandbytes is here)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    numel = math.prod(shape)
    n_blocks = -(-numel // blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), generator=g, dtype=torch.uint8, device=device)
    absmax = torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.uint8, device=device)
    code2 = torch.sort(torch.rand(256, generator=g, device=device) * 2 - 1).values
    absmax2 = torch.rand(-(-n_blocks // 256), generator=g, device=device) * 0.5 + 0.01
    offset = torch.rand((), generator=g, device=device) + 0.1
    try:
        from bitsandbytes.functional import QuantState

        state2 = QuantState(absmax=absmax2, code=code2, blocksize=256, dtype=torch.float32)
        return packed, QuantState(absmax=absmax, shape=torch.Size(shape), code=None, blocksize=blocksize,
                                  quant_type="nf4", dtype=dtype, offset=offset, state2=state2)  # fmt: skip
    except ImportError:
        state2 = types.SimpleNamespace(absmax=absmax2, code=code2, blocksize=256)
        qs = types.SimpleNamespace(absmax=absmax, shape=torch.Size(shape), blocksize=blocksize, quant_type="nf4",
                                   dtype=dtype, offset=offset, state2=state2, nested=True)  # fmt: skip
        return packed, qs


def bench_nf4(nf4, timer: Timer, device: str, bandwidth: float, smoke: bool, summary: list):
    import torch

    try:
        import bitsandbytes.functional as bnb_functional

        bnb_ok = device == "cpu" or torch.cuda.is_available() and _bnb_has_cuda()
    except ImportError:
        bnb_functional, bnb_ok = None, False
    shapes = {"tiny": [(33, 130), (64, 200)]} if smoke else LLAMA_LAYER_SHAPES
    variants = [8, 32] if smoke else [4, 8, 16, 32, 64]
    rows = []
    for model, layer_shapes in shapes.items():
        for shape in layer_shapes:
            numel = math.prod(shape)
            dtype = torch.bfloat16
            bytes_moved = numel // 2 + numel // 64 + 4 * (numel // 64 // 256 + 1) + numel * 2
            sets = [random_nf4(shape, device, dtype, seed) for seed in range(copies_needed(bytes_moved, device))]
            packed, qs = sets[0]
            reference = nf4.dequantize_nf4_reference(packed, qs)
            checks = []
            for bpp in variants:
                out = torch.full(shape, float("nan"), dtype=dtype, device=device)
                got = nf4.dequantize_nf4_triton(packed, qs, out=out.view(-1), blocks_per_program=bpp)
                checks.append(torch.equal(got.view(torch.int16), reference.view(torch.int16)))
            if bnb_ok:
                checks.append(torch.equal(bnb_functional.dequantize_4bit(packed, qs).view(torch.int16).reshape(shape),
                                          reference.view(torch.int16)))  # fmt: skip
            times = {}
            for bpp in variants:
                times[bpp] = timer.median_ms(rotating([
                    (lambda p=p, q=q: nf4.dequantize_nf4_triton(p, q, blocks_per_program=bpp)) for p, q in sets
                ]))  # fmt: skip
            best = min(times, key=times.get)
            bnb_ms = (timer.median_ms(rotating([(lambda p=p, q=q: bnb_functional.dequantize_4bit(p, q)) for p, q in sets]))
                      if bnb_ok else float("nan"))  # fmt: skip
            ref_ms = timer.median_ms(lambda: nf4.dequantize_nf4_reference(packed, qs))
            gbps = bytes_moved / times[best] / 1e6
            rows.append([model, f"{shape[0]}x{shape[1]}", "ok" if all(checks) else "MISMATCH", best,
                         times[best], gbps, f"{100 * gbps / bandwidth:.0f}%", bnb_ms, bnb_ms / times[best],
                         ref_ms, " ".join(f"{b}:{t:.3g}" for b, t in times.items())])  # fmt: skip
    print_table(
        "NF4 dequant -> bf16 (double quant, blocksize 64); bytes = packed + absmax + out",
        ["model", "out x in", "bitwise", "best bpp", "triton ms", "GB/s", "of copy", "bnb ms", "bnb/triton",
         "torch ref ms", "ms per blocks_per_program"],
        rows,
    )  # fmt: skip
    worst = min((r[5] / bandwidth for r in rows), default=float("nan"))
    summary.append(f"NF4 dequant: all bitwise equal: {all(r[2] == 'ok' for r in rows)}; "
                   f"worst {100 * worst:.0f}% of copy bandwidth; bnb/triton median "
                   f"{statistics.median([r[8] for r in rows]):.2f}x")  # fmt: skip


def _bnb_has_cuda() -> bool:
    try:
        import bitsandbytes as bnb
        import torch

        packed, qs = bnb.functional.quantize_4bit(torch.randn(64, 64, device="cuda"), quant_type="nf4")
        bnb.functional.dequantize_4bit(packed, qs)
        return True
    except Exception as error:  # no CUDA library for this torch, say
        print(f"bitsandbytes on CUDA unusable here: {error}")
        return False


def pack_int4(codes, along: str, order=tuple(range(8))):
    """Pack int codes 0..15 into int32 words: along="rows" ([8R, C] -> [R, C]) or "cols" ([R, 8C] -> [R, C])."""
    import torch

    codes = codes.to(torch.int64)
    if along == "rows":
        parts = codes.reshape(-1, 8, codes.shape[1]).unbind(1)
    else:
        grouped = codes.reshape(codes.shape[0], -1, 8)
        parts = [grouped[:, :, column] for column in order]
    words = torch.zeros_like(parts[0])
    for i, part in enumerate(parts):
        words |= part << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def random_w4a16(w4a16, layout, in_features, out_features, group_size, act_order, device, seed):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    n_groups = -(-in_features // group_size)
    codes = torch.randint(0, 16, (in_features, out_features), generator=g, device=device)
    zeros = torch.randint(1, 16, (n_groups, out_features), generator=g, device=device)
    scales = (torch.rand(n_groups, out_features, generator=g, device=device) * 0.02 + 0.002).half()
    if layout == "awq":
        return pack_int4(codes, "cols", w4a16.AWQ_ORDER), pack_int4(zeros, "cols", w4a16.AWQ_ORDER), scales, None
    g_idx = None  # k // group_size: the kernel's aligned-groups path (QuantLinearW4A16 drops trivial g_idx too)
    if act_order:
        g_idx = (torch.arange(in_features, device=device, dtype=torch.int32) // group_size)[torch.randperm(in_features, generator=g, device=device)]
    return pack_int4(codes, "rows"), pack_int4(zeros - 1 if layout == "gptq" else zeros, "cols"), scales, g_idx


W4A16_BLOCKS = {
    1: [(1, 32, 128), (1, 64, 128), (1, 64, 256), (1, 128, 64), (1, 16, 256)],
    16: [(16, 64, 64), (16, 64, 128), (16, 128, 64), (16, 32, 128)],
    128: [(64, 64, 64), (64, 128, 64), (128, 128, 64), (128, 64, 64), (128, 128, 32)],
}


def graph_replay_ms(calls, timer: Timer) -> float:
    """Milliseconds per call with the calls captured in one CUDA graph (kernel time, no launch or host
    work); NaN when capture fails, which is itself what this measures: a call that does host work per
    call cannot be captured."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
    except Exception as exc:
        print(f"CUDA graph capture failed: {type(exc).__name__}: {exc}")
        return float("nan")
    return timer.median_ms(graph.replay) / len(calls)


def bench_w4a16(w4a16, timer: Timer, device: str, bandwidth: float, smoke: bool, summary: list):
    import torch

    shapes = [(64, 48)] if smoke else [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
    cases = [("gptq", False), ("gptq", True), ("awq", False)]
    batches = [1, 3, 17] if smoke else [1, 16, 128]
    group_size = 16 if smoke else 128
    rows = []
    for in_features, out_features in shapes:
        for layout, act_order in cases:
            weight_bytes = in_features * out_features // 2 + 2 * 2 * (in_features // group_size) * out_features
            sets = [random_w4a16(w4a16, layout, in_features, out_features, group_size, act_order, device, seed)
                    for seed in range(copies_needed(weight_bytes, device))]  # fmt: skip
            for m in batches:
                x = torch.randn(m, in_features, device=device).half()
                qweight, qzeros, scales, g_idx = sets[0]
                args = (qweight, qzeros, scales, g_idx, layout, group_size)
                expected = w4a16.w4a16_matmul_reference(x, *args)
                dense = w4a16.dequantize_w4a16_reference(*args)
                block_list = W4A16_BLOCKS[{1: 1, 3: 16, 17: 128}.get(m, m)]
                if smoke:
                    block_list = [(b[0], 16, 16) if b[0] == 1 else (16, 16, 16) for b in block_list[:2]]
                times, ok = {}, True
                for blocks in block_list:
                    out = torch.full((m, out_features), float("nan"), dtype=x.dtype, device=device)
                    got = w4a16.w4a16_matmul_triton(x, *args, blocks=blocks, out=out)
                    err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
                    ok &= not torch.isnan(got).any().item() and err < 2e-3
                    times[blocks] = timer.median_ms(rotating([
                        (lambda s=s: w4a16.w4a16_matmul_triton(x, *s, layout, group_size, blocks=blocks)) for s in sets
                    ]))  # fmt: skip
                best = min(times, key=times.get)
                # the default call (default_blocks, split-K for M=1) eagerly, and captured in a CUDA graph
                default_calls = [(lambda s=s: w4a16.w4a16_matmul_triton(x, *s, layout, group_size)) for s in sets]
                call_ms = timer.median_ms(rotating(default_calls))
                graph_ms = graph_replay_ms(default_calls, timer) if device == "cuda" else float("nan")
                bytes_moved = weight_bytes + 2 * m * (in_features + out_features) + 4 * in_features
                floor_ms = bytes_moved / bandwidth / 1e6
                deq_cublas_ms = timer.median_ms(rotating([
                    (lambda s=s: x @ w4a16.dequantize_w4a16_reference(*s, layout, group_size)) for s in sets
                ]))  # fmt: skip
                cublas_ms = timer.median_ms(lambda: x @ dense)
                rows.append([f"{in_features}x{out_features}", layout + ("+act" if act_order else ""), m,
                             "ok" if ok else "MISMATCH", str(best), times[best], floor_ms,
                             f"{100 * floor_ms / times[best]:.0f}%", deq_cublas_ms, deq_cublas_ms / times[best],
                             cublas_ms, call_ms, graph_ms, f"{100 * floor_ms / graph_ms:.0f}%"])  # fmt: skip
    print_table(
        "W4A16 y = x @ dequant(W), fp16, group 128; floor = fewest bytes / copy bandwidth",
        ["K x N", "layout", "M", "check", "best blocks", "triton ms", "floor ms", "of floor", "deq+cuBLAS ms",
         "speedup", "cuBLAS fp16 ms", "default call ms", "graph ms", "graph of floor"],
        rows,
    )  # fmt: skip
    for m in batches:
        sel = [r for r in rows if r[2] == m]
        summary.append(f"W4A16 M={m}: all checks ok: {all(r[3] == 'ok' for r in sel)}; median speedup vs "
                       f"dequant+cuBLAS {statistics.median([r[9] for r in sel]):.2f}x; median "
                       f"{statistics.median([100 * r[6] / r[5] for r in sel]):.0f}% of the bandwidth floor "
                       f"(best blocks), {statistics.median([100 * r[6] / r[12] for r in sel]):.0f}% "
                       f"(default call in a CUDA graph)")  # fmt: skip


LORA_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


def build_nf4_llama(config, device, compute_dtype):
    """A randomly initialised Llama built on `device`, its decoder linears NF4 with double quant (as loading does)."""
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(compute_dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).to(compute_dtype)
    finally:
        torch.set_default_dtype(default_dtype)
    for layer in model.model.layers:
        for name in LORA_TARGETS:
            parent_name, child = name.split(".")
            parent = getattr(layer, parent_name)
            linear = getattr(parent, child)
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                          compute_dtype=compute_dtype, compress_statistics=True,
                                          quant_type="nf4", device="meta")  # fmt: skip
            quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", module=quantized).to(device)  # fmt: skip
            setattr(parent, child, quantized)
            del linear
    model.is_loaded_in_4bit = True  # what peft reads to wrap bnb layers in its bitsandbytes LoRA layer
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def attach_random_lora(model):
    """LoRA r=16 on every decoder linear, with a random B (init_lora_weights=False), not peft's zeros, so the
    LoRA output and grad A are not zero on both sides of a comparison."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[n.split(".")[1] for n in LORA_TARGETS],
                      task_type="CAUSAL_LM", init_lora_weights=False)  # fmt: skip
    model = get_peft_model(model, lora)
    model.train()
    return model


def build_qlora_llama(config, device, compute_dtype):
    """A randomly initialised Llama with NF4 (double quant) decoder linears and LoRA r=16 on all of them."""
    return attach_random_lora(build_nf4_llama(config, device, compute_dtype))


def bench_train(qlora_linear, timer: Timer, device: str, args, summary: list):
    import torch
    from transformers import LlamaConfig

    if args.smoke_cpu:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        seq, steps = 32, 1
    else:  # Llama-3-8B
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=args.train_layers, num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=8192)  # fmt: skip
        seq, steps = args.seq, args.train_steps
    t0 = time.perf_counter()
    model = build_qlora_llama(config, device, torch.bfloat16)
    print(f"\nbuilt the QLoRA model ({config.num_hidden_layers} layers) in {time.perf_counter() - t0:.0f} s")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=g, device=device)

    def step(variant: str, update: bool = True):
        if variant == "qtune fused":
            assert qlora_linear.patch_peft_model(model) == 7 * config.num_hidden_layers
        else:
            qlora_linear.unpatch_peft_model(model)
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timer.sync()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if update:
            optimizer.step()
        timer.sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        return seconds, peak, loss.item()

    variants = ["plain peft+bnb", "qtune fused"]
    # correctness first: same weights, same batch, no update
    losses, grads = {}, {}
    for variant in variants:
        _, _, losses[variant] = step(variant, update=False)
        grads[variant] = torch.cat([p.grad.float().flatten() for p in params])
    grad_err = ((grads[variants[1]] - grads[variants[0]]).norm() / grads[variants[0]].norm()).item()
    del grads
    results = {v: [] for v in variants}
    for round_ in range(2 + steps):
        order = variants if round_ % 2 == 0 else variants[::-1]  # alternate who goes first
        for variant in order:
            seconds, peak, _ = step(variant)
            if round_ >= 2:
                results[variant].append((seconds, peak))
    qlora_linear.unpatch_peft_model(model)
    rows = []
    for variant in variants:
        seconds = statistics.median(s for s, _ in results[variant])
        peak = max(p for _, p in results[variant])
        rows.append([variant, f"{seq}", f"{seconds * 1e3:.0f}", seq / seconds, peak, f"{losses[variant]:.4f}"])
    speedup = rows[1][3] / rows[0][3]
    print_table(
        f"QLoRA training step: Llama-3-8B shape, {config.num_hidden_layers} layers, LoRA r=16 all linear, "
        "grad checkpointing, bf16 autocast, AdamW; alternating, median of the timed steps",
        ["variant", "tokens", "ms/step", "tokens/s", "peak GiB", "loss (step 0)"],
        rows,
    )
    print(f"fused vs plain on one batch, no update: loss diff {abs(losses[variants[1]] - losses[variants[0]]):.2e}, "
          f"relative LoRA grad diff {grad_err:.2e}")  # fmt: skip
    summary.append(f"QLoRA step: fused {speedup:.2f}x tokens/s of plain, peak {rows[1][4]:.1f} vs {rows[0][4]:.1f} GiB; "
                   f"grad rel diff {grad_err:.1e}")  # fmt: skip


def main() -> int:
    args = parse_args()
    if args.smoke_cpu:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if not torch.cuda.is_available() and not args.smoke_cpu:
        print("no CUDA device: nothing to benchmark (use --smoke-cpu to exercise this script on CPU)")
        return 0
    device = "cpu" if args.smoke_cpu else "cuda"
    nf4, w4a16, qlora_linear = import_qtune_kernels()
    if not nf4.HAS_TRITON:
        print("triton is not importable: nothing to benchmark")
        return 0
    if args.pytest:
        import pytest

        code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_kernels.py")])
        print(f"pytest exit code {int(code)}")
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}")
    import triton

    print(f"triton {triton.__version__}")
    timer = Timer(device)
    summary: list[str] = []
    bandwidth = bench_bandwidth(timer, device)
    summary.append(f"copy bandwidth {bandwidth:.0f} GB/s")
    sections = [
        (not args.skip_nf4, lambda: bench_nf4(nf4, timer, device, bandwidth, args.smoke_cpu, summary)),
        (not args.skip_w4a16, lambda: bench_w4a16(w4a16, timer, device, bandwidth, args.smoke_cpu, summary)),
        (not args.skip_train, lambda: bench_train(qlora_linear, timer, device, args, summary)),
    ]
    for enabled, run in sections:
        if enabled:
            try:
                run()
            except Exception as error:  # keep the other sections' numbers
                import traceback

                traceback.print_exc()
                summary.append(f"section failed: {type(error).__name__}: {error}")
            if device == "cuda":
                torch.cuda.empty_cache()
    print("\n## summary" + (" (CPU smoke run: timings mean nothing)" if args.smoke_cpu else ""))
    for line in summary:
        print("- " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
