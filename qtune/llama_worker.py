"""llama.cpp in a child process, so that a native crash (SIGILL on a CPU that lacks an instruction the
build uses, a segfault on a damaged file) costs the artifact being scored, not the whole run.

The parent (``qtune.gguf_model.LlamaCppCausalLM``) starts ``python -m qtune.llama_worker`` and talks to
it over its stdin and stdout in frames: a 4-byte length, a JSON header, an 8-byte length and a raw
payload (float32 logits). This module imports only llama_cpp and numpy, so the child starts in well
under a second.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import IO, Any

import numpy as np


def send(stream: IO[bytes], header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    encoded = json.dumps(header).encode()
    stream.write(struct.pack("<I", len(encoded)))
    stream.write(encoded)
    stream.write(struct.pack("<Q", len(payload)))
    stream.write(payload)
    stream.flush()


def _read_exactly(stream: IO[bytes], count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError("the other side closed the pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(stream: IO[bytes]) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<I", _read_exactly(stream, 4))
    header = json.loads(_read_exactly(stream, length))
    (size,) = struct.unpack("<Q", _read_exactly(stream, 8))
    return header, _read_exactly(stream, size) if size else b""


class _Runtime:
    def __init__(self, path: str, n_ctx: int, threads: int, kv_cache: list[int] | None = None):
        """``kv_cache``: the K and V cache's ggml types, run with flash attention as llama.cpp needs for a
        quantized V cache; without it the cache stays in F32 (type 0) so that only the file's weights are measured."""
        import llama_cpp  # pyright: ignore[reportMissingImports]  # optional: scripts/build_oracles.sh installs it

        type_k, type_v = kv_cache or (0, 0)
        self.llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            logits_all=True,
            verbose=False,
            n_threads=threads,
            type_k=type_k,
            type_v=type_v,
            flash_attn=kv_cache is not None,
        )
        self.n_ctx = n_ctx

    def describe(self) -> dict[str, Any]:
        meta = self.llm.metadata
        stops = sorted({int(meta[key]) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if key in meta})
        return {"n_vocab": self.llm.n_vocab(), "stops": stops}

    def scores(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the {self.n_ctx}-token context")
        self.llm.reset()
        self.llm.eval(ids)
        return np.ascontiguousarray(self.llm.scores[: len(ids)], dtype=np.float32)

    def generate(self, ids: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
        """Greedy decoding: the argmax of llama.cpp's logits, until a stop token or the budget."""
        scores, generated = self.scores(ids), []
        for _ in range(max_new_tokens):
            token = int(np.argmax(scores[-1]))
            generated.append(token)
            if token in stops or self.llm.n_tokens >= self.n_ctx:
                break
            self.llm.eval([token])
            scores = self.llm.scores[self.llm.n_tokens - 1 : self.llm.n_tokens]
        return generated


def serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    runtime: _Runtime | None = None
    while True:
        try:
            header, _ = receive(requests)
        except EOFError:  # the parent is gone
            return
        op = header.get("op")
        try:
            if op == "load":
                runtime = _Runtime(header["path"], header["n_ctx"], header["threads"], header.get("kv_cache"))
                send(replies, runtime.describe())
            elif op == "scores":
                logits = runtime.scores(header["ids"])
                send(replies, {"shape": list(logits.shape)}, memoryview(logits).cast("B"))
            elif op == "generate":
                send(replies, {"tokens": runtime.generate(header["ids"], header["max_new_tokens"], header["stops"])})
            elif op == "close":
                return
            else:
                send(replies, {"error": f"unknown request {op!r}"})
        except Exception as exc:  # reported to the parent, which fails the artifact with this message
            send(replies, {"error": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    # Frames go out on a private copy of stdout; anything native code prints lands on stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
