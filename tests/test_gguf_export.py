"""GGUF export (qtune.formats.gguf) against gguf-py, llama.cpp (llama-cpp-python) and the HF model.

llama.cpp oracles need llama-cpp-python: build and install it with scripts/build_llama_cpp.sh; without
it those tests skip. The tokenizer is the built-in model's (SmolLM2, BPE "smollm"), saved next to tiny
random models of every architecture in qtune.architectures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from oracles import convert_with_llama_cpp, llama_quantize, needs_llama_cpp, needs_llama_cpp_source
from qtune.errors import QtuneError
from qtune.formats.gguf import convert as gguf_convert
from qtune.formats.gguf import vocab as gguf_vocab
from qtune.formats.gguf.convert import export_gguf
from qtune.formats.gguf.imatrix import read_imatrix, to_gguf_names, write_imatrix
from qtune.formats.gguf.mixes import choose_types, llama_tensor_order
from qtune.formats.gguf.names import hf_to_gguf_name
from qtune.formats.gguf.reader import read_gguf_header
from qtune.formats.gguf.vocab import check_chat_roundtrip
from qtune.imatrix import collect_imatrix
from qtune.modelfile import modelfile_text, write_modelfile
from qtune.quant.ggml_quants import dequantize, row_bytes
from support import tiny_model

Q8_0_KL_LIMIT = 1e-2  # measured 0.9e-3 to 2.7e-3 on the tiny models (random weights, 49k vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    from qtune.models import builtin_checkpoint

    try:
        return builtin_checkpoint("smollm2-135m-instruct")
    except QtuneError as exc:
        pytest.skip(f"built-in model unavailable: {exc}")


def make_model(
    out: Path,
    tokenizer_dir: Path,
    model_type: str = "llama",
    hidden: int = 256,
    inter: int = 512,
    layers: int = 8,
    heads: int = 4,
    kv_heads: int = 2,
    tied: bool = True,
    seed: int = 0,
    norm_noise: float = 0.0,
    **extra,
) -> Path:
    """A tiny random HF checkpoint (weights fp16-representable) with the built-in tokenizer; ``norm_noise``
    moves the norms' weights off their initial constant, so that a swapped or unshifted norm shows."""
    model = tiny_model(
        model_type,
        seed,
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.08,
        **extra,
    ).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)  # HF starts biases at zero, which would hide a wrong permutation
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * norm_noise)
            p.copy_(p.half().float())
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


MODEL_SPECS: dict[str, dict] = {
    "llama": {},
    # 320 / 600 wide rows: k-quant fallbacks, and F16 where even 32 does not divide (600); q/k biases permuted
    "llama-odd": dict(hidden=320, inter=600, heads=5, kv_heads=1, layers=4, tied=False, attention_bias=True),
    "mistral": dict(model_type="mistral", layers=3, tied=False, seed=1),
    "qwen2": dict(model_type="qwen2", layers=3, seed=2),
    # per-head q/k norms; heads x head_dim (384) wider than hidden (256), as in Qwen3-0.6B
    "qwen3": dict(model_type="qwen3", layers=3, seed=5, head_dim=96, norm_noise=0.2),
    # phi3: fused qkv and gate_up, MHA as Phi-3-mini, and GQA as Phi-3-medium. Not named "phi3": llama.cpp
    # gives a model so named Phi-3's own tokenizer attributes, and fails on the built-in tokenizer's vocabulary
    "fused-qkv": dict(model_type="phi3", layers=3, kv_heads=4, tied=False, seed=6, norm_noise=0.2),
    "fused-qkv-gqa": dict(model_type="phi3", layers=2, tied=False, seed=7),
    # norms storing weight - 1, soft-capped attention and logits, GELU, tied, every other layer a 16-token
    # sliding window (shorter than the prompts); llama.cpp scales queries by head_dim, so the scalar is head_dim
    "gemma2": dict(model_type="gemma2", layers=3, seed=8, head_dim=64, query_pre_attn_scalar=64, sliding_window=16, norm_noise=0.2),
    # Gemma 3's text model: q/k norms, local RoPE base for the sliding layers, linear scaling on the global
    # ones, and a layer pattern other than llama.cpp's default (written out); -6: the default pattern
    "gemma3": dict(
        model_type="gemma3_text",
        layers=3,
        seed=9,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        },
        norm_noise=0.2,
    ),
    "gemma3-6": dict(model_type="gemma3_text", layers=6, seed=10, head_dim=64, query_pre_attn_scalar=64, sliding_window=16, norm_noise=0.2),
    "llama3-rope": dict(
        layers=2,
        seed=3,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
    ),
    "linear-rope": dict(layers=2, seed=4, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
}


@pytest.fixture(scope="session")
def models(tmp_path_factory, builtin_dir) -> dict[str, Path]:
    """Tiny checkpoints by name (MODEL_SPECS), built on first use."""
    root = tmp_path_factory.mktemp("models")

    class Models(dict):
        def __missing__(self, name):
            self[name] = make_model(root / name, builtin_dir, **MODEL_SPECS[name])
            return self[name]

    return Models()


@pytest.fixture(scope="session")
def exported(tmp_path_factory, models) -> dict[tuple[str, str], Path]:
    """Lazily exported files, shared by the tests."""
    root = tmp_path_factory.mktemp("gguf")

    class Exports(dict):
        def __missing__(self, key):
            model, quant = key
            path = root / f"{model}-{quant}.gguf"
            export_gguf(models[model], path, quant)
            self[key] = path
            return path

    return Exports()


def read_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    _, infos = read_gguf_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {t.name: (t.qtype.name, t.shape, data[t.offset : t.offset + t.nbytes].tobytes()) for t in infos}


def read_kv(path: Path) -> dict:
    return read_gguf_header(path)[0]


def assert_same_file(ours: Path, theirs: Path) -> None:
    """Byte-identical files; on a difference, say which tensors or keys differ."""
    if ours.read_bytes() == theirs.read_bytes():
        return
    a, b = read_tensors(ours), read_tensors(theirs)
    assert list(a) == list(b), "tensor order differs"
    bad = [f"{n}: ours {a[n][0]} {a[n][1]}, llama.cpp {b[n][0]} {b[n][1]}" for n in a if a[n] != b[n]]
    assert not bad, "tensors differ:\n" + "\n".join(bad[:10])
    ka, kb = read_kv(ours), read_kv(theirs)
    assert ka == kb, [k for k in set(ka) | set(kb) if ka.get(k) != kb.get(k)]
    raise AssertionError("same tensors and keys, but the files differ (key order or padding)")


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def llama_cpp_model(path: Path, n_ctx: int = 256):
    import llama_cpp

    # F32 KV cache: the default F16 cache alone moves logits by ~1e-3
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)


def llama_cpp_kl_to_hf(model_dir: Path, gguf_path: Path, ids: list[int]):
    """Mean KL per token of llama.cpp's logits on ``gguf_path`` from transformers' on ``model_dir``, and the
    llama.cpp model (for more use)."""
    ref = log_softmax(hf_logits(model_dir, ids))
    llm = llama_cpp_model(gguf_path)
    llm.eval(ids)
    got = log_softmax(np.array(llm.scores[: len(ids)], dtype=np.float64))
    return float((np.exp(ref) * (ref - got)).sum(-1).mean()), llm


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def prompt_ids(builtin_dir: Path, n: int = 48) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_dir)
    text = "The quick brown fox jumps over the lazy dog. Quantization maps weights to a few levels, " * 4
    return tok.encode(text)[:n]


# ---------------------------------------------------------------- type choice (no llama.cpp needed)


def _llama_names(n_layer: int, width: int = 256, ff: int = 512, tied: bool = True) -> list[tuple[str, tuple]]:
    names = [("token_embd.weight", (1000, width)), ("output_norm.weight", (width,))]
    if not tied:
        names.append(("output.weight", (1000, width)))
    for i in range(n_layer):
        for part, shape in [
            ("attn_q", (width, width)),
            ("attn_k", (width // 2, width)),
            ("attn_v", (width // 2, width)),
            ("attn_output", (width, width)),
            ("ffn_gate", (ff, width)),
            ("ffn_up", (ff, width)),
            ("ffn_down", (width, ff)),
            ("attn_norm", (width,)),
            ("ffn_norm", (width,)),
        ]:
            names.append((f"blk.{i}.{part}.weight", shape))
    return names


@pytest.mark.parametrize(
    "n_layer,more_bits",
    [
        (8, {0, 3, 6, 7}),
        (32, {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}),
    ],
)
def test_q4_k_m_rules(n_layer, more_bits):
    choice = choose_types("Q4_K_M", _llama_names(n_layer), n_layer)
    for i in range(n_layer):
        want = Q.Q6_K if i in more_bits else Q.Q4_K
        assert choice.types[f"blk.{i}.attn_v.weight"] == want
        assert choice.types[f"blk.{i}.ffn_down.weight"] == want
        assert choice.types[f"blk.{i}.attn_q.weight"] == Q.Q4_K
        assert choice.types[f"blk.{i}.attn_norm.weight"] == Q.F32
    assert choice.types["token_embd.weight"] == Q.Q6_K  # tied: the output rule
    assert choice.fallbacks == []
    untied = choose_types("Q4_K_M", _llama_names(n_layer, tied=False), n_layer)
    assert untied.types["token_embd.weight"] == Q.Q4_K and untied.types["output.weight"] == Q.Q6_K


def test_mix_rules_and_fallbacks():
    q3 = choose_types("Q3_K_M", _llama_names(32), 32).types
    assert [q3[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert [q3[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert q3["blk.5.attn_output.weight"] == Q.Q4_K and q3["blk.5.attn_q.weight"] == Q.Q3_K
    q4s = choose_types("Q4_K_S", _llama_names(32), 32).types
    assert [q4s[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == [Q.Q5_K, Q.Q4_K]
    assert [q4s[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == [Q.Q5_K, Q.Q4_K]
    q5s = choose_types("Q5_K_S", _llama_names(8), 8).types
    assert q5s["blk.0.attn_v.weight"] == Q.Q5_K and q5s["token_embd.weight"] == Q.Q6_K
    pure = choose_types("Q4_0", _llama_names(8), 8).types
    assert pure["token_embd.weight"] == Q.Q4_0 and pure["blk.0.ffn_down.weight"] == Q.Q4_0

    odd = choose_types("Q4_K_M", _llama_names(8, width=576, ff=1536), 8)
    assert odd.types["token_embd.weight"] == Q.Q8_0  # output rule: rows not a multiple of 256
    assert odd.types["blk.0.attn_q.weight"] == Q.Q5_0 and odd.types["blk.0.attn_v.weight"] == Q.Q8_0
    assert odd.types["blk.0.ffn_down.weight"] == Q.Q6_K  # 1536 = 6 * 256
    assert {(f.wanted, f.used) for f in odd.fallbacks} == {(Q.Q4_K, Q.Q5_0), (Q.Q6_K, Q.Q8_0)}
    assert str(odd.fallbacks[0]) == "blk.0.attn_k.weight: rows of 576 are not a multiple of 256 (Q4_K), using Q5_0"
    f16 = choose_types("Q5_K_M", [("blk.0.ffn_down.weight", (64, 600))], 1)
    assert f16.types["blk.0.ffn_down.weight"] == Q.F16 and f16.fallbacks[0].used == Q.F16
    with pytest.raises(ValueError, match="unknown GGUF quantization 'Q7_K'.*Q4_K_M"):
        choose_types("Q7_K", [], 1)


def test_iq4_mix_rules():
    """llama.cpp's IQ4_NL/IQ4_XS file types: Q6_K output, Q5_K attn_v under GQA of 4 or more, and Q5_K for
    the first eighth of ffn_down unless an imatrix is given; IQ4_XS rows not a multiple of 256 take IQ4_NL."""
    names = _llama_names(16)
    xs = choose_types("IQ4_XS", names, 16, n_gqa=2).types
    assert xs["token_embd.weight"] == Q.Q6_K and xs["blk.5.attn_q.weight"] == Q.IQ4_XS and xs["blk.5.attn_v.weight"] == Q.IQ4_XS
    assert [xs[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2)] == [Q.Q5_K, Q.Q5_K, Q.IQ4_XS]
    gqa = choose_types("IQ4_XS", names, 16, n_gqa=4, has_imatrix=True).types
    assert all(gqa[f"blk.{i}.attn_v.weight"] == Q.Q5_K for i in range(16))
    assert all(gqa[f"blk.{i}.ffn_down.weight"] == Q.IQ4_XS for i in range(16))
    nl = choose_types("IQ4_NL", names, 16).types
    assert nl["blk.0.ffn_down.weight"] == Q.Q5_K and nl["blk.3.attn_k.weight"] == Q.IQ4_NL
    odd = choose_types("IQ4_XS", _llama_names(8, width=576, ff=1536), 8)
    assert odd.types["blk.0.attn_q.weight"] == Q.IQ4_NL and odd.types["blk.1.ffn_down.weight"] == Q.IQ4_XS
    assert (Q.IQ4_XS, Q.IQ4_NL) in {(f.wanted, f.used) for f in odd.fallbacks}


def test_llama_tensor_order():
    names = ["blk.10.attn_q.weight", "output.weight", "blk.2.ffn_up.weight", "token_embd.weight", "blk.2.attn_k.weight"]
    assert llama_tensor_order(names) == ["output.weight", "token_embd.weight", "blk.2.attn_k.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]


# ---------------------------------------------------------------- file contents (gguf-py)


def test_f32_tensors_are_the_hf_weights(models, exported):
    from safetensors.torch import load_file

    model_dir = models["llama-odd"]
    weights = load_file(model_dir / "model.safetensors")
    tensors = read_tensors(exported["llama-odd", "F32"])
    assert "output.weight" in tensors and len(tensors) == 2 + 1 + 4 * (9 + 4)  # + q/k/v/o biases
    for hf_name, w in weights.items():
        qtype, shape, data = tensors[hf_to_gguf_name(hf_name)]
        values = np.frombuffer(data, dtype=np.float32).reshape(shape)
        if ".q_proj." in hf_name or ".k_proj." in hf_name:
            heads = 5 if ".q_proj." in hf_name else 1
            w = w.reshape(heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(values.reshape(w.shape), w.numpy(), err_msg=hf_name)
    assert "output.weight" not in [t.name for t in read_gguf_header(exported["llama", "Q4_K_M"])[1]]


@pytest.mark.parametrize(
    "model,quant",
    [
        ("llama-odd", "Q4_K_M"),
        pytest.param("qwen2", "Q4_K_M", marks=pytest.mark.slow),
        pytest.param("qwen2", "Q3_K_M", marks=pytest.mark.slow),
        pytest.param("llama", "BF16", marks=pytest.mark.slow),
    ],
)
def test_gguf_py_dequantizes_like_ours(exported, model, quant):
    reader = gguf.GGUFReader(str(exported[model, quant]))  # the independent reader, slow on a 49k vocabulary
    kinds = set()
    for t in reader.tensors:
        n_per_row, raw = int(t.shape[0]), np.ascontiguousarray(t.data)
        if t.tensor_type == Q.F32:
            ours = raw.astype(np.float32)
        else:
            rows = torch.from_numpy(raw.view(np.uint8).copy().reshape(-1, row_bytes(t.tensor_type, n_per_row)))
            ours = dequantize(rows, t.tensor_type, n_per_row).numpy()
        theirs = gguf.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(ours.reshape(-1), np.asarray(theirs, dtype=np.float32).reshape(-1), err_msg=t.name)
        kinds.add(t.tensor_type)
    assert len(kinds) >= 2
    kv, infos = read_gguf_header(exported[model, quant])  # our fast header reader agrees with gguf-py
    assert kv == {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    assert [(i.name, i.offset, i.nbytes) for i in infos] == [(t.name, t.data_offset, t.n_bytes) for t in reader.tensors]


def test_metadata_and_chat_roundtrip(models, exported, builtin_dir, tmp_path):
    kv = read_kv(exported["qwen2", "Q4_K_M"])
    assert kv["general.architecture"] == "qwen2" and kv["general.file_type"] == 15
    assert kv["qwen2.block_count"] == 3 and kv["qwen2.attention.head_count_kv"] == 2
    # transformers loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer (qwen2 split regex)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    assert read_kv(exported["llama", "Q4_K_M"])["tokenizer.ggml.pre"] == "smollm"
    assert len(kv["tokenizer.ggml.tokens"]) == 49152 and len(kv["tokenizer.ggml.merges"]) > 40000
    assert kv["tokenizer.ggml.eos_token_id"] == 2 and kv["tokenizer.ggml.add_bos_token"] is False
    assert read_kv(exported["mistral", "F16"])["general.architecture"] == "llama"
    assert check_chat_roundtrip(exported["qwen2", "Q4_K_M"], models["qwen2"]) == []

    other = tmp_path / "other-tokenizer"
    shutil.copytree(builtin_dir, other, ignore=shutil.ignore_patterns("*.safetensors"))
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    problems = check_chat_roundtrip(exported["qwen2", "Q4_K_M"], other)
    assert len(problems) == 1 and "chat template differs" in problems[0]


def test_unsupported_architecture(tmp_path, models):
    bad = tmp_path / "gpt2"
    shutil.copytree(models["qwen2"], bad)
    config = (bad / "config.json").read_text().replace('"model_type": "qwen2"', '"model_type": "gpt2"')
    (bad / "config.json").write_text(config)
    with pytest.raises(QtuneError, match="does not support the 'gpt2' architecture; supported: llama, mistral, qwen2"):
        export_gguf(bad, tmp_path / "x.gguf", "Q8_0")


def test_missing_tokenizer(tmp_path, models):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models["qwen2"] / name, bare / name)
    with pytest.raises(QtuneError, match="has no tokenizer"):
        export_gguf(bare, tmp_path / "x.gguf", "Q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_unknown_pre_tokenizer(tmp_path, models):
    import json

    odd = tmp_path / "odd-tokenizer"
    shutil.copytree(models["llama"], odd)
    spec = json.loads((odd / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (odd / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(QtuneError, match="BPE pre-tokenizer .* is not one llama.cpp knows"):
        export_gguf(odd, tmp_path / "x.gguf", "Q8_0")


def test_failed_write_leaves_no_file(tmp_path, models, monkeypatch):
    calls = []
    real_write = gguf.GGUFWriter.write_tensor_data

    def disk_full(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, tensor, *args, **kwargs)

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.gguf").write_bytes(b"previous")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(models["qwen2"], out / "model.gguf", "Q8_0")
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf"]
    assert (out / "model.gguf").read_bytes() == b"previous"


# ---------------------------------------------------------------- llama.cpp oracles


@needs_llama_cpp
@pytest.mark.parametrize(
    "model",
    [
        "llama",
        "qwen2",
        "llama-odd",
        "llama3-rope",
        "qwen3",
        "fused-qkv",
        "gemma2",
        "gemma3",
        *[pytest.param(m, marks=pytest.mark.slow) for m in ("mistral", "linear-rope", "fused-qkv-gqa", "gemma3-6")],
    ],
)
def test_llama_cpp_f16_matches_hf(models, exported, builtin_dir, model):
    ids = prompt_ids(builtin_dir)
    kl, llm = llama_cpp_kl_to_hf(models[model], exported[model, "F16"], ids)
    assert kl <= 1e-4, kl

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(models[model], dtype=torch.float32).eval()
    prompt = ids[:8]
    with torch.no_grad():
        hf_out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, attention_mask=torch.ones(1, len(prompt), dtype=torch.long)
        )[0, len(prompt) :].tolist()
    llm.reset()
    llm.eval(prompt)
    cpp_out = []
    for _ in range(32):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        cpp_out.append(token)
        llm.eval([token])
    assert cpp_out == hf_out


@needs_llama_cpp
@pytest.mark.parametrize("model", ["llama", "qwen3", "fused-qkv", "gemma2", "gemma3"])
def test_llama_cpp_q8_0_is_close_to_hf(models, exported, builtin_dir, model):
    kl, _ = llama_cpp_kl_to_hf(models[model], exported[model, "Q8_0"], prompt_ids(builtin_dir))
    assert kl <= Q8_0_KL_LIMIT, kl


@needs_llama_cpp
@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_llama_cpp_tokenizes_like_hf(models, exported, model):
    import llama_cpp
    from transformers import AutoTokenizer

    text = gguf_vocab._CHECK_TEXT + "\n<|im_start|>user\nHello 12345 world!<|im_end|>\n  indented\tcode = f(x)  # 3.14159 ünïcödé 日本語"
    tok = AutoTokenizer.from_pretrained(models[model])
    llm = llama_cpp.Llama(model_path=str(exported[model, "Q4_K_M"]), vocab_only=True, verbose=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert llm.detokenize(ids, special=True).decode() == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat, add_special_tokens=False)


@needs_llama_cpp
@pytest.mark.parametrize(
    "model,quant",
    [
        ("llama", "Q4_K_M"),
        ("llama-odd", "Q4_K_M"),
        ("qwen2", "Q4_K_M"),
        ("llama-odd", "Q2_K"),
        ("llama", "IQ4_XS"),
        ("llama-odd", "IQ4_XS"),
        ("llama-odd", "IQ4_NL"),
        ("qwen3", "Q4_K_M"),
        ("fused-qkv", "Q4_K_M"),
        ("gemma2", "Q4_K_M"),
        ("gemma3", "Q4_K_M"),
        *[
            pytest.param(m, q, marks=pytest.mark.slow)
            for m, q in [
                ("mistral", "Q5_K_M"),
                ("llama", "Q3_K_M"),
                ("llama", "Q4_K_S"),
                ("llama-odd", "Q5_K_S"),
                ("llama", "Q6_K"),
                ("llama-odd", "Q8_0"),
                ("llama", "Q4_0"),
                ("llama-odd", "Q4_1"),
                ("llama", "Q5_1"),
                ("qwen2", "F16"),
                ("llama", "BF16"),
                ("qwen3", "Q3_K_M"),
                ("fused-qkv", "Q5_K_M"),
                ("qwen2", "IQ4_NL"),
            ]
        ],
    ],
)
def test_equals_llama_model_quantize(exported, tmp_path, model, quant):
    theirs = tmp_path / "llama.gguf"
    llama_quantize(exported[model, "F32"], theirs, quant)
    assert_same_file(exported[model, quant], theirs)


@needs_llama_cpp
def test_imatrix_export_equals_llama_model_quantize(models, exported, builtin_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = models["llama-odd"]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(builtin_dir, 40)])
    stats = collect_imatrix(hf, [ids, ids[:, :20]])
    assert stats.counts["model.layers.0.mlp.down_proj"] == 60
    inputs = []
    hook = hf.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: inputs.append(i[0]) and None)
    with torch.no_grad():
        hf(ids)
        hf(ids[:, :20])
    hook.remove()
    manual = sum((x[0].double() ** 2).sum(0) for x in inputs)
    torch.testing.assert_close(stats.sums["model.layers.1.mlp.down_proj"], manual)
    means = stats.means()

    ours = tmp_path / "ours.gguf"
    report = export_gguf(model_dir, ours, "Q4_K_M", imatrix=means)
    assert any(t.imatrix for t in report.tensors)
    assert report.size_bytes == ours.stat().st_size and report.quant == "Q4_K_M" and report.file_type == 15
    assert {(f.wanted, f.used) for f in report.fallbacks} == {(Q.Q4_K, Q.Q5_0), (Q.Q6_K, Q.Q8_0), (Q.Q4_K, Q.F16), (Q.Q6_K, Q.F16)}
    by_name = {t.name: t for t in report.tensors}
    assert by_name["blk.0.attn_q.weight"].qtype == "Q5_0" and by_name["blk.0.attn_q.weight"].bits_per_weight == 5.5
    assert by_name["blk.0.attn_norm.weight"].qtype == "F32" and not by_name["blk.0.attn_norm.weight"].imatrix
    assert 5.0 < report.bits_per_weight < 9.0 and "Q4_K_M" in report.summary()
    theirs = tmp_path / "llama.gguf"
    gguf_means = to_gguf_names(stats).means()
    llama_quantize(exported["llama-odd", "F32"], theirs, "Q4_K_M", {k: v.numpy() for k, v in gguf_means.items()})
    assert_same_file(ours, theirs)
    assert read_tensors(ours)["blk.0.attn_q.weight"] != read_tensors(exported["llama-odd", "Q4_K_M"])["blk.0.attn_q.weight"]

    # IQ4_XS with the same imatrix: its ffn_down rule reads whether one is given
    ours_iq4, theirs_iq4 = tmp_path / "ours-iq4.gguf", tmp_path / "llama-iq4.gguf"
    export_gguf(model_dir, ours_iq4, "IQ4_XS", imatrix=means)
    llama_quantize(exported["llama-odd", "F32"], theirs_iq4, "IQ4_XS", {k: v.numpy() for k, v in gguf_means.items()})
    assert_same_file(ours_iq4, theirs_iq4)

    # the imatrix file round trip gives llama.cpp's loader values
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, to_gguf_names(stats))
    back = read_imatrix(path)
    kv = read_kv(path)
    assert kv["general.type"] == "imatrix" and kv["imatrix.chunk_size"] == 512
    assert back.counts == to_gguf_names(stats).counts
    for name, values in back.means().items():
        torch.testing.assert_close(values, gguf_means[name], rtol=0, atol=0)


def test_legacy_imatrix_read(tmp_path):
    import struct

    values = np.array([2.0, 4.0, 6.0], dtype=np.float32)
    name = b"blk.0.attn_q.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 2, 3) + values.tobytes()
    (tmp_path / "old.dat").write_bytes(data)
    stats = read_imatrix(tmp_path / "old.dat")
    torch.testing.assert_close(stats.means()["blk.0.attn_q.weight"], torch.tensor([1.0, 2.0, 3.0]))
    (tmp_path / "junk.dat").write_bytes(b"\x00\x00")
    with pytest.raises(QtuneError, match="neither a GGUF nor a legacy"):
        read_imatrix(tmp_path / "junk.dat")


def test_modelfile(tmp_path, models, exported):
    path = write_modelfile(exported["qwen2", "Q4_K_M"], models["qwen2"])
    text = path.read_text()
    assert text.startswith(f"FROM ./{exported['qwen2', 'Q4_K_M'].name}\n")
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    other = modelfile_text("m.gguf", "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}", "</s>")
    assert "TEMPLATE" not in other.replace("# TEMPLATE omitted", "") and 'PARAMETER stop "</s>"' in other
    llama3 = modelfile_text("m.gguf", "<|start_header_id|>{{ role }}<|end_header_id|>{{ c }}<|eot_id|>", "<|eot_id|>")
    assert "<|start_header_id|>assistant<|end_header_id|>" in llama3 and llama3.count('PARAMETER stop "<|eot_id|>"') == 1


@needs_llama_cpp_source
@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama-odd", "mistral", "llama3-rope", "qwen3", "fused-qkv", "gemma3-6"])
def test_f32_equals_convert_hf_to_gguf(models, exported, tmp_path, model):
    """Our F32 file against llama.cpp's own converter: same tensors (bytes), same model and tokenizer keys."""
    checkpoint = models[model]
    if MODEL_SPECS[model].get("model_type") == "phi3":
        # llama.cpp's Phi-3 converter reads a BPE vocabulary only under tokenizer_class GPT2Tokenizer (Phi-4's)
        checkpoint = tmp_path / "checkpoint"
        shutil.copytree(models[model], checkpoint)
        tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
        (checkpoint / "tokenizer_config.json").write_text(json.dumps(tokenizer_config | {"tokenizer_class": "GPT2Tokenizer"}))
    theirs = convert_with_llama_cpp(checkpoint, tmp_path / "convert.gguf", "--outtype", "f32")
    ours = read_tensors(exported[model, "F32"])
    assert sorted(ours) == sorted(read_tensors(theirs))
    assert ours == read_tensors(theirs)
    # naming keys (general.name/basename/size_label/version) are cosmetic; we also state add_eos_token
    cosmetic = {"general.name", "general.basename", "general.size_label", "general.version", "tokenizer.ggml.add_eos_token"}
    ka, kb = read_kv(exported[model, "F32"]), read_kv(theirs)
    # we always state whether the tokenizer adds BOS (HF's behaviour); the converter only does for some architectures
    if "tokenizer.ggml.add_bos_token" not in kb:
        cosmetic.add("tokenizer.ggml.add_bos_token")
    assert {k: v for k, v in ka.items() if k not in cosmetic} == {k: v for k, v in kb.items() if k not in cosmetic}


@pytest.fixture(scope="session")
def dense_dir(builtin_dir, tmp_path_factory) -> Path:
    from support import dense_wide_llama_dir

    return dense_wide_llama_dir(builtin_dir, tmp_path_factory.mktemp("dense") / "model")


def test_dense_model_is_the_builtin_model(builtin_dir, dense_dir):
    """The rewrite the quality-order test scores keeps the built-in model's logits, with dense weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([prompt_ids(builtin_dir)])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)(ids).logits
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()
    weights = load_file(dense_dir / "model.safetensors")
    blocks = weights["model.layers.3.mlp.down_proj.weight"].reshape(-1, 32)[:64]
    assert min(len(torch.unique(b)) for b in blocks) == 32  # no longer a 16-level Q4_1 grid
    names = [(hf_to_gguf_name(n), tuple(t.shape)) for n, t in weights.items()]
    choice = choose_types("Q4_K_M", names, 30)
    assert not choice.fallbacks and {choice.types[n] for n, shape in names if len(shape) == 2} == {Q.Q4_K, Q.Q6_K}


@needs_llama_cpp
@pytest.mark.slow
def test_quality_order(dense_dir, tmp_path):
    """Perplexity under each export, scored by llama.cpp on the same text, falls in the order of the types.

    Scored on the built-in model rewritten with dense weights and 768-wide rows (see ``dense_dir``):
    the built-in model itself is a dequantized Q4_1 file, on whose 16-level blocks Q4_K_M lands closer
    than Q5_K_M, and its 576-wide rows send most tensors to llama.cpp's legacy fallbacks.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense_dir)
    text = (Path(__file__).read_text() + (Path(gguf_convert.__file__).read_text()))[:20000]
    ids = tok.encode(text)[:512]
    ppl, kl, reference = {}, {}, None
    f32 = tmp_path / "F32.gguf"
    export_gguf(dense_dir, f32, "F32")
    for quant in ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M"):
        path = tmp_path / f"{quant}.gguf"
        export_gguf(dense_dir, path, quant)
        if quant == "Q4_K_M":
            llama_quantize(f32, tmp_path / "llama.gguf", quant)
            assert_same_file(path, tmp_path / "llama.gguf")
        llm = llama_cpp_model(path, n_ctx=len(ids))
        llm.eval(ids)
        logp = log_softmax(np.array(llm.scores[: len(ids)], dtype=np.float64))
        reference = logp if reference is None else reference
        kl[quant] = float((np.exp(reference) * (reference - logp)).sum(-1).mean())
        ppl[quant] = float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))
        llm.close()
        path.unlink()
    assert all(np.isfinite(v) for v in ppl.values()), ppl
    assert abs(ppl["Q8_0"] - ppl["F16"]) / ppl["F16"] < 0.01 and kl["Q8_0"] < 0.01, (ppl, kl)
    order = ["F16", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M"]
    assert [ppl[q] for q in order] == sorted(ppl[q] for q in order), ppl
    assert [kl[q] for q in order] == sorted(kl[q] for q in order), kl


# ---------------------------------------------------------------- GGUF LoRA adapters


def make_adapter(base: Path, out: Path, seed: int = 0, **config) -> Path:
    """A PEFT LoRA adapter on ``base`` with random (nonzero) A and B, saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]) | config
    peft_model = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(out)
    return out


def peft_logits(base: Path, adapter: Path, ids: list[int]) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("model,settings", [("llama", {}), ("qwen2", {}), ("llama", {"use_rslora": True}), ("llama", {"alpha_pattern": {"v_proj": 4.0}})])
def test_lora_adapter_layout(models, tmp_path, model, settings):
    from qtune.formats.gguf.lora import export_gguf_lora

    adapter = make_adapter(models[model], tmp_path / "adapter", **settings)
    report = export_gguf_lora(adapter, models[model], tmp_path / "lora.gguf", "F32")
    kv, infos = read_gguf_header(report.path)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    folded = bool(settings)
    assert kv["adapter.lora.alpha"] == pytest.approx(8.0 if folded else 16.0)
    tensors = {t.name: t for t in infos}
    layers = json.loads((models[model] / "config.json").read_text())["num_hidden_layers"]
    assert len(tensors) == report.tensors == 2 * 7 * layers  # lora_a and lora_b of 7 modules per layer
    reader = gguf.GGUFReader(report.path)  # the gguf package reads every tensor back
    data = {t.name: np.array(t.data) for t in reader.tensors}
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    a = weights["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].numpy()
    b = weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].numpy()
    assert data["blk.1.attn_v.weight.lora_a"].shape == (8, a.shape[1]) and np.array_equal(data["blk.1.attn_v.weight.lora_a"], a)
    scale = {"use_rslora": 16 / np.sqrt(8), "alpha_pattern": 4.0 / 8}.get(next(iter(settings), ""), 1.0)
    np.testing.assert_allclose(data["blk.1.attn_v.weight.lora_b"], b * scale, rtol=1e-6)


@needs_llama_cpp
@pytest.mark.parametrize(
    "model,settings",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("llama", {"use_rslora": True}),
        ("qwen3", {"target_modules": "all-linear"}),
        ("fused-qkv", {"target_modules": "all-linear"}),
        ("gemma2", {"target_modules": "all-linear"}),
        ("gemma3", {"target_modules": "all-linear"}),
    ],
)
def test_llama_cpp_applies_lora_like_peft(models, exported, builtin_dir, tmp_path, model, settings):
    """Base GGUF + our LoRA GGUF in llama.cpp against the PEFT model (unmerged) in transformers."""
    import llama_cpp

    from qtune.formats.gguf.lora import export_gguf_lora

    adapter = make_adapter(models[model], tmp_path / "adapter", **settings)
    lora = export_gguf_lora(adapter, models[model], tmp_path / "lora.gguf", "F32").path
    ids = prompt_ids(builtin_dir)
    ref = log_softmax(peft_logits(models[model], adapter, ids))
    base_only = log_softmax(hf_logits(models[model], ids))
    llm = llama_cpp.Llama(
        model_path=str(exported[model, "F32"]), lora_path=str(lora), n_ctx=256, n_batch=256, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0
    )
    llm.eval(ids)
    got = log_softmax(np.array(llm.scores[: len(ids)], dtype=np.float64))
    kl = (np.exp(ref) * (ref - got)).sum(-1).mean()
    assert kl <= 1e-4, kl
    assert (np.exp(ref) * (ref - base_only)).sum(-1).mean() > 100 * max(kl, 1e-6)  # the adapter matters


def test_lora_adapter_bad_input(models, tmp_path):
    from qtune.formats.gguf.lora import export_gguf_lora

    with pytest.raises(QtuneError, match="not a PEFT LoRA adapter"):
        export_gguf_lora(tmp_path, models["llama"], tmp_path / "x.gguf")
    dora = make_adapter(models["llama"], tmp_path / "dora", use_dora=True)
    with pytest.raises(QtuneError, match="DoRA"):
        export_gguf_lora(dora, models["llama"], tmp_path / "x.gguf")
    saved = make_adapter(models["llama"], tmp_path / "saved", modules_to_save=["lm_head"])
    with pytest.raises(QtuneError, match="trains whole modules"):
        export_gguf_lora(saved, models["llama"], tmp_path / "x.gguf")
    plain = make_adapter(models["llama"], tmp_path / "plain")
    with pytest.raises(QtuneError, match="F32, F16, BF16"):
        export_gguf_lora(plain, models["llama"], tmp_path / "x.gguf", "Q4_K")
    assert not (tmp_path / "x.gguf").exists()
