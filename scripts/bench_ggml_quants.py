"""Time qtune's GGUF quantizers against ggml_quantize_chunk on an [N, K] matrix.

    OMP_NUM_THREADS=2 python scripts/bench_ggml_quants.py --rows 1024 --threads 2
    python scripts/bench_ggml_quants.py --device cuda --rows 4096      # GPU run, ggml still on CPU

ggml gets the same number of CPU threads (row slices quantized in parallel, as llama-quantize
does). The ggml column needs llama-cpp-python (scripts/build_llama_cpp.sh); without it only our
timings are printed. Every run also checks that both produce the same bytes. Each encoder is warmed
up first (on CPU that loads or compiles it), then the two are timed alternately, median of --repeats.
QTUNE_GGML_ENCODER=torch times the torch encoders on CPU instead of the compiled ones.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from qtune.quant.ggml_quants import quantize, row_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles import libggml_base  # noqa: E402 - the tests' oracles


def load_ggml_quantize_chunk():
    path = libggml_base()
    if path is None:
        return None
    fn = ctypes.CDLL(str(path)).ggml_quantize_chunk
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    return fn


def ggml_quantize(fn, x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None, threads: int) -> np.ndarray:
    rows, n = x.shape
    rb = row_bytes(qtype, n)
    out = np.zeros((rows, rb), dtype=np.uint8)
    qw = None if imatrix is None else imatrix.ctypes.data
    step = (rows + threads - 1) // threads

    def work(r0: int) -> None:  # ctypes drops the GIL during the call
        nr = min(step, rows - r0)
        fn(int(qtype), x[r0].ctypes.data, out[r0].ctypes.data, 0, nr, n, qw)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(0, rows, step)))
    return out


def timed(f):
    t0 = time.perf_counter()
    result = f()
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    imatrix = rng.lognormal(0.0, 1.0, args.cols).astype(np.float32)
    xt = torch.from_numpy(x).to(args.device)
    qwt = torch.from_numpy(imatrix).to(args.device)
    fn = load_ggml_quantize_chunk()

    def ours(qtype: GGMLQuantizationType, qw: torch.Tensor | None) -> torch.Tensor:
        data = quantize(xt, qtype, qw)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return data

    print(f"[{args.rows}, {args.cols}] float32, {args.threads} CPU threads, ours on {args.device}, median of {args.repeats}")
    print(f"{'type':6} {'imatrix':8} {'ours s':>9} {'ggml s':>9} {'ours/ggml':>10}  bytes")
    for name in args.types:
        qtype = GGMLQuantizationType[name]
        for qw_np, qw_t in ((None, None), (imatrix, qwt)):
            quantize(xt[: min(8, args.rows)], qtype, qw_t)  # warm-up: compiled encoder, CUDA context
            t_ours, t_ref = [], []
            for _ in range(args.repeats):
                data, t = timed(lambda: ours(qtype, qw_t))
                t_ours.append(t)
                if fn is not None:
                    ref, t = timed(lambda: ggml_quantize(fn, x, qtype, qw_np, args.threads))
                    t_ref.append(t)
            mine = statistics.median(t_ours)
            if fn is None:
                print(f"{name:6} {str(qw_np is not None):8} {mine:9.3f} {'-':>9} {'-':>10}  (no llama_cpp)")
                continue
            theirs = statistics.median(t_ref)
            same = "equal" if np.array_equal(data.cpu().numpy(), ref) else "DIFFER"
            print(f"{name:6} {str(qw_np is not None):8} {mine:9.3f} {theirs:9.3f} {mine / theirs:10.2f}  {same}")


if __name__ == "__main__":
    main()
