"""Which runtimes load each file qtune writes, and why one can't: one table, read by every export's report,
the run's report and the README's "Where each file runs".

A runtime "loads" a file when it runs it unchanged. ``proved_by`` names the test that loads it there, or is
None where nothing here tests it (Ollama: not installable on the test machines).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

RUNTIMES = ("transformers", "GPTQModel", "vLLM", "llama.cpp", "Ollama")
MERGED = "merged"

_GGUF_ONLY = "runs GGUF files only: export format gguf"
_NOT_GGUF = "no GGUF path: vLLM 0.32 moved GGUF to an out-of-tree plugin that runs on CUDA only"
_TRANSFORMERS_GGUF = "dequantizes the whole file to float when it loads it (gguf_file=...): no memory saved"
_VLLM_8BIT = {  # compressed-tensors schemes with 8-bit activations: where vLLM's kernels for them run
    "W8A8": "int8 GEMMs on CPU (oneDNN) and on NVIDIA GPUs from Turing (sm75)",
    "FP8": "FP8 GEMMs on CPU and on Ada/Hopper GPUs (sm89+); older GPUs run FP8 weights with 16-bit activations",
}


@dataclass(frozen=True)
class Support:
    runtime: str
    loads: bool
    note: str = ""  # why it can't, or the condition under which it can
    proved_by: str | None = None  # the test that loads the file in this runtime

    def as_dict(self) -> dict:
        return asdict(self)


def _gptq_in_vllm(bits: int, sym: bool) -> Support:
    if bits not in (4, 8):
        return Support("vLLM", False, f"its GPTQ loader takes 4- and 8-bit checkpoints only, not {bits}-bit: export 4 or 8 bits")
    if not sym:
        return Support(
            "vLLM",
            False,
            "its GPTQ loader takes symmetric checkpoints only and drops GPTQ zero points: set sym: true, "
            "or export compressed-tensors (the same GPTQ rounding) or AWQ, asymmetric 4-bit in layouts vLLM loads",
        )
    return Support("vLLM", True, proved_by="tests/test_vllm.py")


def runtime_support(fmt: str, bits: int = 4, sym: bool = True, scheme: str = "W4A16") -> list[Support]:
    """Each of RUNTIMES for a file of format ``fmt`` (an export format, or MERGED; ``scheme`` for
    compressed-tensors), in RUNTIMES' order."""
    if fmt == MERGED:
        rows = [
            Support("transformers", True, proved_by="tests/test_merge.py"),
            Support("GPTQModel", False, "serves quantized checkpoints: export format gptq or awq"),
            Support("vLLM", True, proved_by="tests/test_vllm.py"),
            Support("llama.cpp", False, _GGUF_ONLY),
            Support("Ollama", False, _GGUF_ONLY),
        ]
    elif fmt == "gguf":
        rows = [
            Support("transformers", True, _TRANSFORMERS_GGUF, "tests/test_report.py"),
            Support("GPTQModel", False, "reads GPTQ and AWQ checkpoints, not GGUF"),
            Support("vLLM", False, _NOT_GGUF),
            Support("llama.cpp", True, proved_by="tests/test_gguf_export.py"),
            Support("Ollama", True, "through the Modelfile written beside it"),
        ]
    elif fmt == "gguf-lora":
        adapter = "a GGUF LoRA adapter: load the run's peft adapter (adapter/) instead"
        rows = [
            Support("transformers", False, adapter),
            Support("GPTQModel", False, adapter),
            Support("vLLM", False, adapter),
            Support("llama.cpp", True, "with --lora over the base model's GGUF", "tests/test_gguf_export.py"),
            Support("Ollama", True, "as ADAPTER in a Modelfile over the base model's GGUF"),
        ]
    elif fmt == "compressed-tensors":
        transformers_note = "with the compressed-tensors package installed" + (
            "; tested decompressed (run_compressed=False), which computes with 16-bit activations" if scheme in _VLLM_8BIT else ""
        )
        rows = [
            Support("transformers", True, transformers_note, "tests/test_compressed_tensors.py"),
            Support("GPTQModel", False, "reads GPTQ and AWQ checkpoints: export format gptq or awq"),
            Support("vLLM", True, _VLLM_8BIT.get(scheme, ""), "tests/test_vllm.py"),
            Support("llama.cpp", False, _GGUF_ONLY),
            Support("Ollama", False, _GGUF_ONLY),
        ]
    else:
        rows = [
            Support("transformers", True, "with gptqmodel and optimum installed", "tests/test_gptq_awq_loaders.py"),
            Support("GPTQModel", True, proved_by="tests/test_gptq_awq_loaders.py"),
            _gptq_in_vllm(bits, sym) if fmt == "gptq" else Support("vLLM", True, "fp16 or bf16 activations", "tests/test_vllm.py"),
            Support("llama.cpp", False, _GGUF_ONLY),
            Support("Ollama", False, _GGUF_ONLY),
        ]
    assert tuple(r.runtime for r in rows) == RUNTIMES
    return rows


def refusals(fmt: str, required: list[str], bits: int = 4, sym: bool = True, scheme: str = "W4A16") -> list[Support]:
    """The runtimes named in ``required`` (any case) that would refuse such a file."""
    wanted = {name.lower() for name in required}
    return [row for row in runtime_support(fmt, bits, sym, scheme) if row.runtime.lower() in wanted and not row.loads]
