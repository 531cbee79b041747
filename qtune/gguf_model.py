"""A GGUF file as a model that ``qtune.metrics`` can score.

With llama-cpp-python installed the file runs in llama.cpp itself, the runtime users deploy it on, in a
child process so that a native crash there fails one artifact, not the run.
Without it, transformers' GGUF loader dequantizes the file (through the ``gguf`` package) into the
matching architecture; that scores the same weights, but says nothing about llama.cpp's speed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from qtune import llama_worker
from qtune.quant.ggml_types import KV_CACHE_TYPES, kv_cache_pair

LLAMA_CPP = "llama.cpp"
TRANSFORMERS_GGUF = "transformers-gguf"


def gguf_runtime() -> str:
    return LLAMA_CPP if importlib.util.find_spec("llama_cpp") is not None else TRANSFORMERS_GGUF


def load_gguf_model(path: Path, n_ctx: int, threads: int | None = None, kv_cache: str | None = None):
    """The file behind the causal-LM interface that evaluation uses; ``.runtime`` names what runs it.
    ``kv_cache`` (``"q8_0"``, or ``"q8_0/q4_0"`` for K/V) runs it in llama.cpp with that KV cache."""
    if gguf_runtime() == LLAMA_CPP:
        return LlamaCppCausalLM(path, n_ctx, threads, kv_cache)
    if kv_cache is not None:
        raise RuntimeError(f"a {kv_cache} KV cache is llama.cpp's: install llama-cpp-python (bash scripts/build_oracles.sh) to score it")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model.runtime = TRANSFORMERS_GGUF
    return model


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF file (its size without the metadata and tokenizer)."""
    from qtune.formats.gguf.reader import read_gguf_header

    return sum(t.nbytes for t in read_gguf_header(path)[1])


class LlamaCppCrash(RuntimeError):
    """llama.cpp died (a signal, or an exit) while running a file."""


_SIGNAL_HINTS = {
    signal.SIGILL: "an instruction this CPU does not run; rebuild llama-cpp-python for this machine "
    "(bash scripts/build_llama_cpp.sh builds it with portable flags)",
    signal.SIGSEGV: "a memory fault, often a damaged or truncated GGUF file",
    signal.SIGBUS: "a memory fault, often a GGUF file truncated while it was mapped",
    signal.SIGKILL: "killed, often by the out-of-memory killer",
}


class LlamaCppCausalLM:
    """The slice of a transformers causal LM that evaluation calls (forward logits, greedy generate),
    answered by llama.cpp in a child process (``qtune.llama_worker``), so that a native crash fails this
    artifact only. Token ids come from the run's own tokenizer, so every artifact sees the same input;
    the KV cache is kept in F32 so that only the file's weights are measured, unless ``kv_cache`` names
    llama.cpp cache types to measure (with flash attention, which a quantized V cache needs)."""

    device = torch.device("cpu")

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None, kv_cache: str | None = None):
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.runtime = LLAMA_CPP if kv_cache is None else f"{LLAMA_CPP}, KV cache {kv_cache}, flash attention"
        types = None if kv_cache is None else [int(KV_CACHE_TYPES[name]) for name in kv_cache_pair(kv_cache)]
        self._proc = subprocess.Popen([sys.executable, "-m", "qtune.llama_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._closer = weakref.finalize(self, _stop_worker, self._proc)
        request = {"op": "load", "path": str(self.path), "n_ctx": n_ctx, "threads": threads or torch.get_num_threads(), "kv_cache": types}
        info, _ = self._request(request)
        self.n_vocab = int(info["n_vocab"])
        self.generation_config = SimpleNamespace(eos_token_id=info["stops"])

    def _request(self, header: dict) -> tuple[dict, bytes]:
        try:
            llama_worker.send(self._proc.stdin, header)
            reply, payload = llama_worker.receive(self._proc.stdout)
        except (EOFError, BrokenPipeError, OSError):
            raise self._crash(header["op"]) from None
        if "error" in reply:
            raise RuntimeError(f"llama.cpp could not run {self.path.name}: {reply['error']}")
        return reply, payload

    def _crash(self, op: str) -> LlamaCppCrash:
        code = self._proc.wait(timeout=30)
        if code < 0:
            name = signal.Signals(-code).name
            cause = f"{name}: {_SIGNAL_HINTS.get(signal.Signals(-code), signal.strsignal(-code) or 'a signal')}"
        else:
            cause = f"it exited with code {code}"
        return LlamaCppCrash(f"llama.cpp crashed while running {self.path.name} ({op}): {cause}")

    def close(self) -> None:
        self._closer()

    def eval(self) -> LlamaCppCausalLM:
        return self

    def _scores(self, ids: list[int]) -> np.ndarray:
        reply, payload = self._request({"op": "scores", "ids": ids})
        return np.frombuffer(payload, dtype=np.float32).reshape(reply["shape"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        logits = torch.zeros(*input_ids.shape, self.n_vocab, dtype=torch.float32)
        for row, (ids, keep) in enumerate(zip(input_ids, mask)):
            logits[row, keep] = torch.from_numpy(self._scores(ids[keep].tolist()).copy())
        return SimpleNamespace(logits=logits)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: list[int] | int | None = None,
        pad_token_id: int = 0,
        **_unused,
    ) -> torch.Tensor:
        """Greedy decoding (argmax of llama.cpp's logits), rows padded on the right with pad_token_id."""
        stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or self.generation_config.eos_token_id)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        new_tokens = []
        for ids, keep in zip(input_ids, mask):
            reply, _ = self._request({"op": "generate", "ids": ids[keep].tolist(), "max_new_tokens": max_new_tokens, "stops": stops})
            new_tokens.append(reply["tokens"])
        width = max((len(t) for t in new_tokens), default=0)
        padded = torch.full((input_ids.shape[0], width), pad_token_id, dtype=input_ids.dtype)
        for row, tokens in enumerate(new_tokens):
            padded[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        return torch.cat([input_ids, padded], dim=1)


def _stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            llama_worker.send(proc.stdin, {"op": "close"})
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError, ValueError):
            stream.close()
