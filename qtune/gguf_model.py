"""A GGUF file as a model that ``qtune.evaluate`` can score.

With llama-cpp-python installed the file runs in llama.cpp itself, the runtime users deploy it on.
Without it, transformers' GGUF loader dequantizes the file (through the ``gguf`` package) into the
matching architecture; that scores the same weights, but says nothing about llama.cpp's speed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

LLAMA_CPP = "llama.cpp"
TRANSFORMERS_GGUF = "transformers-gguf"


def gguf_runtime() -> str:
    return LLAMA_CPP if importlib.util.find_spec("llama_cpp") is not None else TRANSFORMERS_GGUF


def load_gguf_model(path: Path, n_ctx: int, threads: int | None = None):
    """The file behind the causal-LM interface that evaluation uses; ``.runtime`` names what runs it."""
    if gguf_runtime() == LLAMA_CPP:
        return LlamaCppCausalLM(path, n_ctx, threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model.runtime = TRANSFORMERS_GGUF
    return model


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF file (its size without the metadata and tokenizer)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


class LlamaCppCausalLM:
    """The slice of a transformers causal LM that evaluation calls (forward logits, greedy generate),
    answered by llama.cpp. Token ids come from the run's own tokenizer, so every artifact sees the same
    input; the KV cache is kept in F32 so that only the file's weights are measured."""

    runtime = LLAMA_CPP
    device = torch.device("cpu")

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None):
        import llama_cpp

        self.path = Path(path)
        self._llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, verbose=False,
            n_threads=threads or torch.get_num_threads(), type_k=0, type_v=0,
        )
        meta = self._llm.metadata
        stops = {int(meta[key]) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if key in meta}
        self.generation_config = SimpleNamespace(eos_token_id=sorted(stops))
        self.n_ctx = n_ctx

    def eval(self) -> LlamaCppCausalLM:
        return self

    def _scores(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the {self.n_ctx}-token context")
        self._llm.reset()
        self._llm.eval(ids)
        return self._llm.scores[: len(ids)]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        logits = torch.zeros(*input_ids.shape, self._llm.n_vocab(), dtype=torch.float32)
        for row, (ids, keep) in enumerate(zip(input_ids, mask)):
            logits[row, keep] = torch.from_numpy(np.array(self._scores(ids[keep].tolist()), dtype=np.float32))
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id: list[int] | int | None = None, pad_token_id: int = 0, **_unused) -> torch.Tensor:
        """Greedy decoding (argmax of llama.cpp's logits), rows padded on the right with pad_token_id."""
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or self.generation_config.eos_token_id)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        new_tokens = []
        for ids, keep in zip(input_ids, mask):
            prompt = ids[keep].tolist()
            scores, generated = self._scores(prompt), []
            for _ in range(max_new_tokens):
                token = int(np.argmax(scores[-1]))
                generated.append(token)
                if token in stops or self._llm.n_tokens >= self.n_ctx:
                    break
                self._llm.eval([token])
                scores = self._llm.scores[self._llm.n_tokens - 1 : self._llm.n_tokens]
            new_tokens.append(generated)
        width = max((len(t) for t in new_tokens), default=0)
        padded = torch.full((input_ids.shape[0], width), pad_token_id, dtype=input_ids.dtype)
        for row, tokens in enumerate(new_tokens):
            padded[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        return torch.cat([input_ids, padded], dim=1)
