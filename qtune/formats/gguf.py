"""HF checkpoint -> one GGUF file (llama.cpp): tensors, architecture metadata, tokenizer, chat template.

The tensors are quantized by qtune's own ggml quantizers (``qtune.quant.ggml_quants``), with the
per-tensor types of llama.cpp's mixes (``qtune.quant.ggml_mixes``), written in llama.cpp's tensor
order. Without an imatrix the result equals, tensor for tensor, what ``llama_model_quantize`` makes
from our F32 file. Supported architectures: llama, mistral (written as llama) and qwen2.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qtune.cpu import fit_threads
from qtune.errors import QtuneError
from qtune.paths import staging_prefix
from qtune.quant.ggml_mixes import Fallback, choose_types, llama_tensor_order, quant_mix
from qtune.quant.ggml_quants import quantize

Q = GGMLQuantizationType


@dataclass(frozen=True)
class _Arch:
    gguf_arch: str
    permute_qk: bool  # HF rotate-half RoPE layout -> llama.cpp's interleaved pairs


# HF model_type -> how llama.cpp's converter writes it
ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("llama", permute_qk=True),
    "mistral": _Arch("llama", permute_qk=True),
    "qwen2": _Arch("qwen2", permute_qk=False),
}

_GLOBAL_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# llama.cpp identifies a BPE pre-tokenizer by the sha256 of the token ids of this text
# (get_vocab_base_pre in llama.cpp's convert_hf_to_gguf / conversion/base.py).
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# The hashes of the llama / mistral / qwen2 families' tokenizers (from llama.cpp's table).
PRE_TOKENIZERS: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# When the hash is unknown (a known tokenizer family with another vocabulary), the pre-tokenizer is
# recognised by its definition: llama.cpp's "pre" selects exactly these split regexes at runtime.
_SPLIT_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_SPLIT_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE_TOKENIZER_REGEXES: dict[str, str] = {
    _SPLIT_HEAD + r"\p{N}{1,3}" + _SPLIT_TAIL: "llama-bpe",  # digits in groups of up to 3
    _SPLIT_HEAD + r"\p{N}" + _SPLIT_TAIL: "qwen2",  # single digits
}


@dataclass(frozen=True)
class TensorReport:
    name: str
    shape: tuple[int, ...]  # numpy order: [rows, n_per_row]
    qtype: str
    nbytes: int
    imatrix: bool  # quantized with importance weights

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / math.prod(self.shape)


@dataclass
class GGUFExportReport:
    path: Path
    quant: str
    file_type: int
    tensors: list[TensorReport] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    size_bytes: int = 0  # the whole file
    n_params: int = 0
    seconds: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        """Tensor data bits per parameter (llama.cpp's BPW)."""
        return 8.0 * sum(t.nbytes for t in self.tensors) / max(1, self.n_params)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.qtype] = counts.get(t.qtype, 0) + 1
        return counts

    def summary(self) -> str:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(self.type_counts().items()))
        return (f"{self.path.name}: {self.quant}, {self.size_bytes / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bpw, "
                f"{len(self.fallbacks)} fallbacks, {self.seconds:.1f} s ({types})")


# ---------------------------------------------------------------- public API


def export_gguf(
    checkpoint_dir: Path,
    output: Path,
    quant: str = "Q4_K_M",
    imatrix: dict[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> GGUFExportReport:
    """Write ``checkpoint_dir`` (an HF safetensors checkpoint with its tokenizer) as one GGUF file.

    ``imatrix`` maps tensors (HF module names such as ``model.layers.0.mlp.down_proj`` or GGUF names
    such as ``blk.0.ffn_down.weight``) to per-input-column importances (mean x², ``qtune.imatrix``).
    The file is written under a temporary name beside ``output`` and renamed when complete.
    """
    with _gc_paused():
        return _write_gguf(checkpoint_dir, output, quant, imatrix, device)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: the tokenizer's and the vocabulary's millions of small objects
    make each full pass cost ~0.1 s, several per export, and an export creates no cycles worth collecting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write_gguf(
    checkpoint_dir: Path,
    output: Path,
    quant: str,
    imatrix: dict[str, torch.Tensor] | None,
    device: str | torch.device,
) -> GGUFExportReport:
    start = time.perf_counter()
    checkpoint_dir, output = Path(checkpoint_dir), Path(output)
    mix = quant_mix(quant)
    config = _read_config(checkpoint_dir)
    arch = _architecture(config)
    hp = _hyperparameters(config)
    tokenizer_kv = tokenizer_metadata(checkpoint_dir, hp["vocab_size"])
    sources = _tensor_sources(checkpoint_dir, config, arch)
    extra = _extra_tensors(config, hp)

    shapes = {name: src.shape for name, src in sources.items()} | {n: tuple(t.shape) for n, t in extra.items()}
    order = llama_tensor_order(shapes)
    is_70b = hp["n_layer"] == 80 and (arch.gguf_arch == "qwen2" or hp["n_head"] != hp["n_head_kv"])
    choice = choose_types(mix.name, [(n, shapes[n]) for n in order], hp["n_layer"], is_70b=is_70b)
    importance = _imatrix_by_gguf_name(imatrix, arch, shapes) if imatrix else {}

    writer = _Writer(path=None, arch=arch.gguf_arch)
    _add_model_metadata(writer, config, checkpoint_dir, arch, hp)
    for key, (value, vtype, sub_type) in tokenizer_kv.items():
        writer.add_key_value(key, value, vtype, sub_type)
    # last and in this order, as llama_model_quantize re-sets them: its output is then byte-identical
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(mix.file_type))

    report = GGUFExportReport(path=output, quant=mix.name, file_type=int(mix.file_type), fallbacks=choice.fallbacks)
    for name in order:
        qtype, shape = choice.types[name], shapes[name]
        nbytes = _nbytes(qtype, shape)
        writer.add_tensor_info(name, _byte_shape(qtype, shape), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        report.n_params += math.prod(shape)

    def tensor_bytes() -> Iterator[np.ndarray]:
        for name in order:
            fit_threads()
            qtype, shape = choice.types[name], shapes[name]
            weight = extra[name] if name in extra else sources[name].load(device)
            weights = importance.get(name)
            if qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):
                weights = None  # ggml ignores it for these types
            rows = weight.reshape(-1, shape[-1]) if len(shape) > 1 else weight.reshape(1, -1)
            data = quantize(rows, qtype, None if weights is None else weights.to(rows.device))
            report.tensors.append(TensorReport(name, shape, qtype.name, data.numel(), weights is not None))
            yield data.cpu().numpy().reshape(-1)

    _write_atomically(writer, output, tensor_bytes())
    report.size_bytes = output.stat().st_size
    report.seconds = time.perf_counter() - start
    return report


LORA_TYPES = ("F32", "F16", "BF16")


@dataclass
class GGUFLoraReport:
    path: Path
    rank: int
    alpha: float
    tensors: int
    seconds: float = 0.0


def export_gguf_lora(adapter_dir: Path, base_checkpoint: Path, output: Path, dtype: str = "F16") -> GGUFLoraReport:
    """Write a PEFT LoRA adapter as a GGUF LoRA adapter (llama.cpp ``--lora``, Ollama ``ADAPTER``).

    ``base_checkpoint`` gives the architecture (config.json): the file applies to a GGUF of that base.
    Tensors are named ``<base tensor>.lora_a`` [rank, in] and ``.lora_b`` [out, rank], with llama's Q/K
    row permutation applied to B, as llama.cpp's convert_lora_to_gguf writes them. llama.cpp scales
    B·A by alpha / rank; an rsLoRA adapter or one with per-module ranks or alphas has its scaling folded
    into B instead (and alpha = rank). DoRA adapters, and adapters that train whole modules
    (``modules_to_save``), have no GGUF LoRA form: export the merged model.
    """
    from safetensors.torch import load_file

    start = time.perf_counter()
    adapter_dir, output = Path(adapter_dir), Path(output)
    dtype = dtype.upper()
    if dtype not in LORA_TYPES:
        raise QtuneError(f"a GGUF LoRA adapter is written as {', '.join(LORA_TYPES)}, not {dtype}")
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise QtuneError(f"{adapter_dir} is not a PEFT LoRA adapter (needs adapter_config.json and adapter_model.safetensors)")
    lora = json.loads(config_file.read_text(encoding="utf-8"))
    if lora.get("peft_type", "LORA") != "LORA":
        raise QtuneError(f"{adapter_dir} is a {lora.get('peft_type')} adapter; only LoRA adapters have a GGUF form")
    if lora.get("use_dora"):
        raise QtuneError("a DoRA adapter has no GGUF LoRA form (llama.cpp applies plain B·A); export the merged model instead")
    if lora.get("modules_to_save"):
        raise QtuneError(f"the adapter trains whole modules ({', '.join(lora['modules_to_save'])}), which a GGUF LoRA "
                         "cannot carry; export the merged model instead")
    config = _read_config(Path(base_checkpoint))
    arch = _architecture(config)
    hp = _hyperparameters(config)
    rank, alpha = int(lora["r"]), float(lora["lora_alpha"])
    rank_pattern, alpha_pattern = lora.get("rank_pattern") or {}, lora.get("alpha_pattern") or {}
    fold_scale = bool(lora.get("use_rslora")) or bool(rank_pattern) or bool(alpha_pattern)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise QtuneError(f"unexpected tensor {key} in {weights_file} (bias or embedding LoRA is not supported)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor.to(torch.float32)

    tensors: dict[str, torch.Tensor] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise QtuneError(f"{module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        name = hf_to_gguf_name(module, config["model_type"]).removesuffix(".weight")
        if fold_scale:
            suffix = module.rsplit(".", 1)[-1]
            r_m = int(next((v for k, v in rank_pattern.items() if module.endswith(k) or k == suffix), rank))
            alpha_m = float(next((v for k, v in alpha_pattern.items() if module.endswith(k) or k == suffix), alpha))
            scaling = alpha_m / (math.sqrt(r_m) if lora.get("use_rslora") else r_m)
            b = b * scaling  # llama.cpp's alpha / rank is then 1: alpha is written as the rank
        if arch.permute_qk and module.endswith("self_attn.q_proj"):
            b = _permute_for_rope(b, hp["n_head"])
        elif arch.permute_qk and module.endswith("self_attn.k_proj"):
            b = _permute_for_rope(b, hp["n_head_kv"])
        tensors[f"{name}.weight.lora_a"] = a
        tensors[f"{name}.weight.lora_b"] = b
    if not tensors:
        raise QtuneError(f"{weights_file} holds no LoRA tensors")
    ranks = {t.shape[0] for n, t in tensors.items() if n.endswith(".lora_a")}
    if fold_scale and len(ranks) > 1:
        raise QtuneError("modules with different ranks cannot share one GGUF alpha; use one rank for every module")
    written_alpha = float(ranks.pop()) if fold_scale else alpha

    writer = _Writer(path=None, arch=arch.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, written_alpha)
    qtype = Q[dtype]
    for name, tensor in tensors.items():
        writer.add_tensor_info(name, _byte_shape(qtype, tuple(tensor.shape)), np.dtype(np.uint8),
                               _nbytes(qtype, tuple(tensor.shape)), raw_dtype=qtype)
    _write_atomically(writer, output, (quantize(t, qtype).numpy().reshape(-1) for t in tensors.values()))
    return GGUFLoraReport(output, rank, written_alpha, len(tensors), time.perf_counter() - start)


def hf_to_gguf_name(hf_name: str, model_type: str = "llama") -> str:
    """The GGUF tensor name of an HF parameter or module name (``.weight`` is assumed when absent)."""
    if model_type not in ARCHITECTURES:
        raise QtuneError(_unsupported_message(model_type))
    if not hf_name.endswith((".weight", ".bias")):
        hf_name += ".weight"
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"blk.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.{suffix}"
    raise QtuneError(f"no GGUF tensor name for '{hf_name}' in a {model_type} model")


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: [rows, n_per_row]
    offset: int  # absolute file offset of the data
    nbytes: int


def read_gguf_header(path: Path) -> tuple[dict[str, object], list[GGUFTensorInfo]]:
    """The KV metadata and tensor infos of a GGUF file (fast: gguf.GGUFReader takes seconds on a vocabulary)."""
    with open(path, "rb") as f:
        buf = f.read(1 << 20)
        while True:
            try:
                return _parse_header(buf)
            except (struct.error, IndexError):
                more = f.read(len(buf))
                if not more:
                    raise QtuneError(f"{path} is not a complete GGUF file") from None
                buf += more


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _parse_header(buf: bytes) -> tuple[dict[str, object], list[GGUFTensorInfo]]:
    magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
    if magic != 0x46554747 or version not in (2, 3):
        raise QtuneError(f"not a GGUF v2/v3 file (magic {magic:#x}, version {version})")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > len(buf):
            raise IndexError
        pos += 8 + n
        return buf[pos - n : pos].decode("utf-8", errors="replace")

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            item_type, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            return [value(item_type) for _ in range(n)]
        fmt = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    kv: dict[str, object] = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        kv[key] = value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        ne = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        qtype = GGMLQuantizationType(qtype)
        shape = tuple(int(x) for x in reversed(ne))
        infos.append(GGUFTensorInfo(name, qtype, shape, offset, _nbytes(qtype, shape)))
    align = int(kv.get("general.alignment", 32))
    data_start = (pos + align - 1) // align * align
    return kv, [GGUFTensorInfo(t.name, t.qtype, t.shape, data_start + t.offset, t.nbytes) for t in infos]


def check_chat_roundtrip(gguf_path: Path, tokenizer_dir: Path) -> list[str]:
    """Problems (empty if none) between the GGUF's chat template / special tokens and the HF tokenizer's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    kv, _ = read_gguf_header(Path(gguf_path))
    value = kv.get

    problems = []
    template, expected_template = value("tokenizer.chat_template"), tokenizer.chat_template
    if template != expected_template:
        problems.append(f"chat template differs: GGUF has {_clip(template)}, tokenizer has {_clip(expected_template)}")
    tokens = value("tokenizer.ggml.tokens") or []
    for role in ("bos", "eos"):
        expected_id = getattr(tokenizer, f"{role}_token_id")
        found_id = value(f"tokenizer.ggml.{role}_token_id")
        if expected_id is not None and found_id != expected_id:
            problems.append(f"{role} token id: GGUF has {found_id}, tokenizer has {expected_id}")
    eos_id, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    if eos_id is not None:
        found = tokens[eos_id] if eos_id < len(tokens) else None
        if found != eos_text:
            problems.append(f"eos token text: GGUF token {eos_id} is {found!r}, tokenizer's eos is {eos_text!r}")
    add_bos = _adds_token(tokenizer, tokenizer.bos_token_id, first=True)
    if value("tokenizer.ggml.add_bos_token") != add_bos:
        problems.append(f"add_bos_token: GGUF has {value('tokenizer.ggml.add_bos_token')}, tokenizer adds BOS: {add_bos}")
    return problems


def tokenizer_metadata(checkpoint_dir: Path, vocab_size: int) -> dict[str, tuple]:
    """GGUF tokenizer KVs {key: (value, GGUFValueType, array item type)} from the HF tokenizer files.

    Byte-level BPE tokenizers (tokenizer.json without byte fallback: Llama 3, SmolLM2, Qwen2) become
    llama.cpp's "gpt2" vocabulary; SentencePiece tokenizers (Llama 2, TinyLlama, Mistral v0.1-v0.3: a
    tokenizer.model, or the byte-fallback BPE tokenizer.json that transformers saves for them) become its
    "llama" (SPM) vocabulary with scores and token types, as llama.cpp's convert_hf_to_gguf writes them.
    """
    from transformers import AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    tokenizer_json = checkpoint_dir / "tokenizer.json"
    spm_file = checkpoint_dir / "tokenizer.model"
    if not tokenizer_json.is_file() and not spm_file.is_file():
        raise QtuneError(
            f"{checkpoint_dir} has no tokenizer (tokenizer.json or tokenizer.model); the GGUF file must carry the "
            "tokenizer, so save it next to the model (tokenizer.save_pretrained)"
        )
    tokenizer_def = json.loads(tokenizer_json.read_text(encoding="utf-8")) if tokenizer_json.is_file() else {}
    model = tokenizer_def.get("model", {})
    byte_level_bpe = model.get("type") == "BPE" and not model.get("byte_fallback")
    sentencepiece = not byte_level_bpe and (spm_file.is_file() or (model.get("type") == "BPE" and model.get("byte_fallback")))
    if not byte_level_bpe and not sentencepiece:
        raise QtuneError(
            f"{tokenizer_json}: the GGUF export supports byte-level BPE (GPT-2 style) and SentencePiece BPE "
            f"tokenizers, got {model.get('type')}"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise QtuneError(f"the tokenizer has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}")

    V, K = gguf.GGUFValueType, gguf.Keys.Tokenizer
    if sentencepiece:
        kv = _sentencepiece_vocab_kv(checkpoint_dir, tokenizer, vocab, vocab_size, model, tokenizer_def)
    else:
        chkhsh = sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
        pre = PRE_TOKENIZERS.get(chkhsh) or _pre_tokenizer_by_definition(tokenizer)
        if pre is None:
            raise QtuneError(
                f"the BPE pre-tokenizer of {checkpoint_dir} is not one llama.cpp knows under qtune's supported models "
                f"(check hash {chkhsh}); supported: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
            )
        tokens, token_types = _vocab(tokenizer, vocab, vocab_size)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        kv = {
            K.MODEL: ("gpt2", V.STRING, None),
            K.PRE: (pre, V.STRING, None),
            K.LIST: (tokens, V.ARRAY, V.STRING),
            K.TOKEN_TYPE: (token_types, V.ARRAY, V.INT32),
            K.MERGES: (merges, V.ARRAY, V.STRING),
        }
    for role, key in (("bos", K.BOS_ID), ("eos", K.EOS_ID), ("unk", K.UNK_ID), ("pad", K.PAD_ID)):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            kv[key] = (int(token_id), V.UINT32, None)
    kv[K.ADD_BOS] = (_adds_token(tokenizer, tokenizer.bos_token_id, first=True), V.BOOL, None)
    kv[K.ADD_EOS] = (_adds_token(tokenizer, tokenizer.eos_token_id, first=False), V.BOOL, None)
    if isinstance(tokenizer.chat_template, str):
        kv[K.CHAT_TEMPLATE] = (tokenizer.chat_template, V.STRING, None)
    return kv


# ---------------------------------------------------------------- checkpoint reading


def _read_config(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise QtuneError(f"{checkpoint_dir} has no config.json; is it a Hugging Face checkpoint?")
    return json.loads(path.read_text(encoding="utf-8"))


def _unsupported_message(model_type: str) -> str:
    return (f"GGUF export does not support the '{model_type}' architecture; supported: "
            f"{', '.join(ARCHITECTURES)}")


def _architecture(config: dict) -> _Arch:
    model_type = config.get("model_type", "?")
    if model_type not in ARCHITECTURES:
        raise QtuneError(_unsupported_message(model_type))
    if config.get("num_local_experts") or config.get("num_experts"):
        raise QtuneError(f"GGUF export does not support mixture-of-experts {model_type} models")
    return ARCHITECTURES[model_type]


def _hyperparameters(config: dict) -> dict:
    n_head = config["num_attention_heads"]
    hp = {
        "n_layer": config["num_hidden_layers"],
        "n_embd": config["hidden_size"],
        "n_ff": config["intermediate_size"],
        "n_head": n_head,
        "n_head_kv": config.get("num_key_value_heads") or n_head,
        "n_ctx": config.get("max_position_embeddings", 4096),
        "eps": config.get("rms_norm_eps", 1e-6),
        "vocab_size": config["vocab_size"],
        "head_dim": config.get("head_dim") or config["hidden_size"] // n_head,
    }
    rope = dict(config.get("rope_parameters") or {})
    if config.get("rope_scaling"):
        rope.update(config["rope_scaling"])
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise QtuneError(f"GGUF export supports RoPE types default, linear and llama3, not '{rope_type}'")
    hp["rope"], hp["rope_type"] = rope, rope_type
    return hp


class _Writer(gguf.GGUFWriter):
    """gguf's writer, packing string and int32 arrays (the vocabulary, merges and token types) in one
    pass: its generic path packs item by item, about 0.25 s for a 49k-token vocabulary."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        V = gguf.GGUFValueType
        if vtype != V.ARRAY or sub_type not in (V.STRING, V.INT32) or not val or self.endianess != gguf.GGUFEndian.LITTLE:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", sub_type, len(val))
        if sub_type == V.INT32:
            return head + np.asarray(val, dtype="<i4").tobytes()
        items = [item.encode("utf-8") if isinstance(item, str) else item for item in val]
        return head + b"".join(struct.pack("<Q", len(item)) + item for item in items)


def _add_model_metadata(writer: gguf.GGUFWriter, config: dict, checkpoint_dir: Path, arch: _Arch, hp: dict) -> None:
    name = config.get("_name_or_path") or checkpoint_dir.name
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(name).rstrip("/").split("/")[-1])
    writer.add_block_count(hp["n_layer"])
    writer.add_context_length(hp["n_ctx"])
    writer.add_embedding_length(hp["n_embd"])
    writer.add_feed_forward_length(hp["n_ff"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_freq_base(float(hp["rope"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(hp["eps"]))
    if config.get("head_dim") is not None:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if hp["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp["rope"]["factor"]))
    if arch.gguf_arch == "llama":
        writer.add_vocab_size(hp["vocab_size"])
        writer.add_rope_dimension_count(hp["head_dim"])


@dataclass
class _Source:
    file: Path
    key: str
    shape: tuple[int, ...]
    permute_heads: int | None  # Q/K rows to reorder for llama.cpp's RoPE layout

    def load(self, device: str | torch.device) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt", device="cpu") as f:
            t = f.get_tensor(self.key)
        t = t.to(device=device, dtype=torch.float32)
        if self.permute_heads:
            t = _permute_for_rope(t, self.permute_heads)
        return t.contiguous()


def _permute_for_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF keeps each head's rotary halves apart; llama.cpp wants them as interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor_sources(checkpoint_dir: Path, config: dict, arch: _Arch) -> dict[str, _Source]:
    from safetensors import safe_open

    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({checkpoint_dir / f for f in weight_map.values()})
    elif (checkpoint_dir / "model.safetensors").is_file():
        files = [checkpoint_dir / "model.safetensors"]
    else:
        files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise QtuneError(f"{checkpoint_dir} has no .safetensors weights (GGUF export reads safetensors checkpoints)")
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    sources: dict[str, _Source] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = hf_to_gguf_name(key, config["model_type"])
                permute = None
                if arch.permute_qk and ".self_attn.q_proj." in key:
                    permute = n_head
                elif arch.permute_qk and ".self_attn.k_proj." in key:
                    permute = n_head_kv
                sources[name] = _Source(file, key, tuple(f.get_slice(key).get_shape()), permute)
    if config.get("tie_word_embeddings", False):
        sources.pop("output.weight", None)
    if "token_embd.weight" not in sources:
        raise QtuneError(f"{checkpoint_dir} has no model.embed_tokens.weight")
    return sources


def _extra_tensors(config: dict, hp: dict) -> dict[str, torch.Tensor]:
    """llama3 RoPE scaling is a per-frequency factor tensor in GGUF (rope_freqs.weight)."""
    if hp["rope_type"] != "llama3":
        return {}
    rope, dim = hp["rope"], hp["head_dim"]
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    # float32 tensor arithmetic per frequency, as llama.cpp's converter does, for the same bits
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(torch.tensor(1.0))
        elif wavelen > old_ctx / low:
            factors.append(torch.tensor(float(factor)))
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.stack(factors).to(torch.float32)}


def _imatrix_by_gguf_name(imatrix: dict[str, torch.Tensor], arch: _Arch, shapes: dict) -> dict[str, torch.Tensor]:
    model_type = "qwen2" if arch.gguf_arch == "qwen2" else "llama"
    out = {}
    for key, values in imatrix.items():
        name = key if key in shapes or re.match(r"(blk\.\d+\.|output\.|token_embd\.)", key) else hf_to_gguf_name(key, model_type)
        if name not in shapes:
            continue  # e.g. output.weight of a tied model
        values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if values.numel() != shapes[name][-1]:
            raise ValueError(f"imatrix entry {key} has {values.numel()} values but {name} has rows of {shapes[name][-1]}")
        if not torch.isfinite(values).all():
            raise ValueError(f"imatrix entry {key} has non-finite values")
        out[name] = values
    return out


# ---------------------------------------------------------------- tokenizer helpers


def _vocab(tokenizer, vocab: dict[str, int], vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (gaps become unused [PADi])."""
    T = gguf.TokenType
    by_id = {i: tok for tok, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
            continue
        if i in added:
            info = added[i]
            if not info.normalized:
                # llama.cpp expects control / user-defined tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(int(T.CONTROL if info.special or looks_special else T.USER_DEFINED))
        else:
            types.append(int(T.NORMAL))
        tokens.append(token)
    return tokens, types


# SentencePiece ModelProto.SentencePiece.Type -> llama.cpp token type (USER_DEFINED pieces stay NORMAL, as in
# llama.cpp's converter; HF lists them as added tokens, which makes them USER_DEFINED below)
_SPM_PIECE_TYPES = {2: gguf.TokenType.UNKNOWN, 3: gguf.TokenType.CONTROL, 5: gguf.TokenType.UNUSED, 6: gguf.TokenType.BYTE}
_SPM_BPE = 2  # TrainerSpec.ModelType
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class _SentencePieceModel:
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1  # UNIGRAM, the proto default
    add_dummy_prefix: bool = True


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a protobuf message: enough of the wire format for tokenizer.model."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            pos += 8
            yield number, wire, buf[pos - 8 : pos]
        elif wire == 2:
            n = varint()
            pos += n
            if pos > len(buf):
                raise ValueError("truncated length-delimited field")
            yield number, wire, buf[pos - n : pos]
        elif wire == 5:
            pos += 4
            yield number, wire, buf[pos - 4 : pos]
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _read_sentencepiece_model(path: Path) -> _SentencePieceModel:
    """Pieces, scores and types of a SentencePiece tokenizer.model (sentencepiece_model.proto ModelProto)."""
    spm = _SentencePieceModel()
    try:
        for number, wire, value in _proto_fields(path.read_bytes()):
            if number == 1 and wire == 2:  # repeated SentencePiece pieces
                piece, score, kind = "", 0.0, 1
                for n, w, v in _proto_fields(value):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        (score,) = struct.unpack("<f", v)
                    elif n == 3 and w == 0:
                        kind = v
                spm.pieces.append((piece, score, kind))
            elif number == 2 and wire == 2:  # TrainerSpec
                for n, w, v in _proto_fields(value):
                    if n == 3 and w == 0:
                        spm.model_type = v
            elif number == 3 and wire == 2:  # NormalizerSpec
                for n, w, v in _proto_fields(value):
                    if n == 3 and w == 0:
                        spm.add_dummy_prefix = bool(v)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError) as exc:
        raise QtuneError(f"{path} is not a SentencePiece model ({exc})") from None
    if not spm.pieces:
        raise QtuneError(f"{path} is not a SentencePiece model (no pieces)")
    return spm


def _sentencepiece_vocab_kv(checkpoint_dir: Path, tokenizer, vocab: dict[str, int], vocab_size: int, model: dict,
                            tokenizer_def: dict) -> dict[str, tuple]:
    """llama.cpp "llama" (SPM) vocabulary KVs: tokens, scores and types for ids 0..vocab_size-1.

    llama.cpp's SPM tokenizer merges the adjacent pair whose joined text has the highest score, which is
    how SentencePiece encodes with a BPE model. From tokenizer.model (llama.cpp's converter) the scores
    are the model's; from a byte-fallback BPE tokenizer.json alone (what transformers 5 saves) a merged
    token scores minus the rank of its first merge, so that llama.cpp merges in the tokenizer's order.
    """
    T, V, K = gguf.TokenType, gguf.GGUFValueType, gguf.Keys.Tokenizer
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    added = _added_tokens(checkpoint_dir, tokenizer)
    spm_file = checkpoint_dir / "tokenizer.model"
    add_space_prefix = None
    if spm_file.is_file():
        spm = _read_sentencepiece_model(spm_file)
        if spm.model_type != _SPM_BPE:
            raise QtuneError(
                f"{spm_file} is a SentencePiece {'unigram' if spm.model_type == 1 else f'type-{spm.model_type}'} model; "
                "llama.cpp's SPM tokenizer reproduces SentencePiece BPE models (Llama 2, Mistral) only"
            )
        if len(spm.pieces) > vocab_size:
            raise QtuneError(f"{spm_file} has {len(spm.pieces)} pieces but the model's vocab_size is {vocab_size}")
        for i, (piece, score, kind) in enumerate(spm.pieces):
            if i not in added and vocab.get(piece) != i:
                raise QtuneError(
                    f"{spm_file} does not match the HF tokenizer in {checkpoint_dir}: piece {i} is {piece!r}, which the "
                    f"tokenizer has as id {vocab.get(piece)}; remove the stale tokenizer.model or re-save the tokenizer"
                )
            tokens[i], scores[i], types[i] = piece, float(score), int(_SPM_PIECE_TYPES.get(kind, T.NORMAL))
        add_space_prefix = spm.add_dummy_prefix
    else:
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
        rank: dict[str, int] = {}
        for r, (left, right) in enumerate(merges):
            rank.setdefault(left + right, r)
        for piece, i in model.get("vocab", {}).items():
            if _BYTE_TOKEN.fullmatch(piece):
                tokens[i], scores[i], types[i] = piece, 0.0, int(T.BYTE)
            else:  # tokens no merge makes never join in either tokenizer; give them the lowest score
                tokens[i], scores[i], types[i] = piece, -float(rank.get(piece, len(merges))), int(T.NORMAL)
    listed = _tokenizer_config(checkpoint_dir).get("added_tokens_decoder") or {}
    for i, (content, special) in sorted(added.items()):
        if i >= vocab_size:
            continue  # only in tokenizer_config.json; llama.cpp's converter skips these too
        if str(i) not in listed and tokens[i] == content and types[i] != int(T.UNUSED):
            # a piece of the base vocabulary that transformers lists as added (<unk> <s> </s>): llama.cpp's
            # converter keeps its SentencePiece type and score; without tokenizer.model, the same ones
            if not spm_file.is_file() and (special or _looks_special(content)):
                types[i] = int(T.UNKNOWN if i == tokenizer.unk_token_id else T.CONTROL)
                scores[i] = 0.0
            continue
        if special or _looks_special(content):
            tokens[i], types[i] = content, int(T.CONTROL)
        else:  # llama.cpp expects user-defined tokens pre-normalized
            tokens[i], types[i] = content.replace("\u2581", " "), int(T.USER_DEFINED)
        scores[i] = -1000.0
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise QtuneError(
            f"the SentencePiece tokenizer of {checkpoint_dir} has no byte-fallback tokens ({', '.join(missing[:3])}, ...); "
            "llama.cpp's SPM tokenizer needs all 256 to encode text outside the vocabulary"
        )

    kv = {
        K.MODEL: ("llama", V.STRING, None),
        K.PRE: ("default", V.STRING, None),
        K.LIST: (tokens, V.ARRAY, V.STRING),
        K.SCORES: (scores, V.ARRAY, V.FLOAT32),
        K.TOKEN_TYPE: (types, V.ARRAY, V.INT32),
    }
    # llama.cpp prepends a space (SentencePiece's dummy prefix) unless told not to
    pre_tokenizer = tokenizer_def.get("pre_tokenizer") or {}
    if pre_tokenizer.get("type") == "Metaspace" and "prepend_scheme" in pre_tokenizer:
        add_space_prefix = pre_tokenizer["prepend_scheme"] != "never"
    config_prefix = _tokenizer_config(checkpoint_dir).get("add_prefix_space")
    if config_prefix is not None:
        add_space_prefix = bool(config_prefix)
    if add_space_prefix is False or config_prefix is not None:
        kv[K.ADD_PREFIX] = (bool(add_space_prefix), V.BOOL, None)
    return kv


def _tokenizer_config(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _added_tokens(checkpoint_dir: Path, tokenizer) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) of the added tokens: the HF tokenizer's (tokenizer.json) and, as llama.cpp's
    converter reads them, tokenizer_config.json's added_tokens_decoder."""
    added = {int(i): (t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()}
    for i, t in (_tokenizer_config(checkpoint_dir).get("added_tokens_decoder") or {}).items():
        added[int(i)] = (t["content"], bool(t.get("special")))
    return added


def _looks_special(token: str) -> bool:
    """Added tokens that llama.cpp's converter makes control tokens even when not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _pre_tokenizer_by_definition(tokenizer) -> str | None:
    """'llama-bpe' / 'qwen2' when the pre-tokenizer is exactly that family's regex split + byte level."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return None
    state = json.loads(backend.pre_tokenizer.__getstate__())
    steps = state.get("pretokenizers", [])
    if state.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, byte_level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None
    return _PRE_TOKENIZER_REGEXES.get(split.get("pattern", {}).get("Regex"))


def _adds_token(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0 if first else -1] == token_id and ids != tokenizer.encode("a", add_special_tokens=False)


def _clip(text) -> str:
    return repr(text if text is None or len(text) < 60 else text[:57] + "...")


# ---------------------------------------------------------------- writing


def _byte_shape(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> tuple[int, ...]:
    block, size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size)


def _nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    return math.prod(_byte_shape(qtype, shape))


def _write_atomically(writer: gguf.GGUFWriter, output: Path, tensors: Iterator[np.ndarray]) -> None:
    """Write header, KVs, tensor infos and tensors to a temporary file, then rename it to ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=staging_prefix(output), dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in tensors:
            writer.write_tensor_data(data)
        for handle in writer.fout or []:
            handle.flush()
            os.fsync(handle.fileno())
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        for handle in writer.fout or []:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                handle.close()
        tmp.unlink(missing_ok=True)
        raise
