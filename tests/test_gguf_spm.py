"""GGUF export of SentencePiece tokenizers (Llama 2 / TinyLlama / Mistral v0.1-v0.3 style) against llama.cpp.

A tiny SentencePiece BPE model with byte fallback is trained here (sentencepiece), wrapped as an HF
LlamaTokenizer and saved next to tiny random llama / mistral models: the llama one keeps tokenizer.model
(llama.cpp's converter path: pieces, scores and types from the proto), the mistral one has only the
tokenizer.json that transformers 5 saves (scores from the merge ranks) and a vocab padded with unused
[PADn] tokens. llama.cpp must then tokenize, detokenize and predict as the HF tokenizer and model do.
"""

from __future__ import annotations

import ctypes
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from oracles import convert_with_llama_cpp, needs_llama_cpp, needs_llama_cpp_source
from qtune.errors import QtuneError
from qtune.formats.gguf.convert import export_gguf
from qtune.formats.gguf.reader import read_gguf_header
from qtune.formats.gguf.vocab import _read_sentencepiece_model, check_chat_roundtrip, tokenizer_metadata
from support import tiny_model

spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed (pip install sentencepiece)")


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
TEXTS = [
    "Hello world",
    "The lazy dog keeps its tokens.",
    "double  spaces,   triple and trailing  ",
    "tabs\tand\nnew lines\n\n",
    "\tleading tab",
    "digits 3.14159, 2024 and #42",
    "unicode café naïve über, 🦙 日本語 Ωμέγα ż",
    "I'm sure you're RIGHT: QUANTIZATION!",
]
# HF's Metaspace adds no dummy-prefix space to a text that starts with one; SentencePiece and llama.cpp do
LEADING_SPACE = [" leading space", "  two leading spaces"]
PAD = 16  # the mistral model's vocab_size exceeds the tokenizer's: [PADn] unused tokens


def _train(out: Path, model_type: str, vocab_size: int) -> Path:
    rng = random.Random(0)
    words = (
        "The quick brown fox jumps over the lazy dog . Quantization maps weights to a few levels , and the "
        "model keeps its tokens : llama mistral hello world café naïve über déjà vu 2024 3.14 #42 (ok) "
        "I'm you're"
    ).split()
    corpus = out.parent / f"{out.stem}.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(3000)))
    # Llama 2's trainer settings: BPE, byte fallback, split digits, identity normalization, spaces kept
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out.with_suffix("")),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        minloglevel=2,
        num_threads=1,
    )
    return out


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("spm") / "tok.model", "bpe", 480)


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory, spm_model) -> Path:
    """An HF LlamaTokenizer (transformers converts tokenizer.model) with a chat template, as save_pretrained writes it."""
    from transformers import LlamaTokenizer

    src = tmp_path_factory.mktemp("spm-src")
    shutil.copy(spm_model, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False})
    )
    tok = LlamaTokenizer.from_pretrained(src)
    tok.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("spm-hf")
    tok.save_pretrained(out)
    return out


def _make_model(out: Path, tokenizer_dir: Path, spm_model: Path | None, model_type: str, pad: int, seed: int) -> Path:
    from transformers import AutoTokenizer

    n_vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    model = tiny_model(
        model_type,
        seed,
        vocab_size=n_vocab + pad,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
    ).float()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # F16-exact, so the F16 GGUF holds the same weights
    model.save_pretrained(out)
    shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
    if spm_model is not None:
        shutil.copy(spm_model, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, hf_tokenizer_dir, spm_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spm-models")
    return {
        "llama": _make_model(root / "llama", hf_tokenizer_dir, spm_model, "llama", pad=0, seed=0),
        "mistral": _make_model(root / "mistral", hf_tokenizer_dir, None, "mistral", pad=PAD, seed=1),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoints) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spm-gguf")
    out = {}
    for name, ckpt in checkpoints.items():
        out[name] = root / f"{name}-F16.gguf"
        export_gguf(ckpt, out[name], "F16")
    return out


def _llama(path: Path, vocab_only: bool = False):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_batch=256, logits_all=not vocab_only, verbose=False, n_threads=1, type_k=0, type_v=0, vocab_only=vocab_only
    )


def _detokenize(llm, ids: list[int], remove_special: bool = False, unparse_special: bool = False) -> str:
    """llama.cpp's llama_detokenize (llama-cpp-python's Llama.detokenize joins token pieces instead)."""
    import llama_cpp

    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    buf = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_detokenize(llm._model.vocab, tokens, len(ids), buf, len(buf), remove_special, unparse_special)
    assert 0 <= n <= len(buf)
    return buf.raw[:n].decode("utf-8")


# ---------------------------------------------------------------- metadata (no llama.cpp needed)


def test_sentencepiece_proto_reader_matches_sentencepiece(spm_model):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    ours = _read_sentencepiece_model(spm_model)
    assert len(ours.pieces) == sp.get_piece_size()
    for i, (piece, score, kind) in enumerate(ours.pieces):
        assert piece == sp.id_to_piece(i) and np.float32(score) == np.float32(sp.get_score(i))
        expected = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
        assert kind == expected, (i, piece)
    assert ours.model_type == 2 and ours.add_dummy_prefix


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_spm_metadata(exported, checkpoints, spm_model, name):
    from transformers import AutoTokenizer

    kv, _ = read_gguf_header(exported[name])
    tok = AutoTokenizer.from_pretrained(checkpoints[name])
    n = len(tok) + (PAD if name == "mistral" else 0)
    tokens, scores, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.scores"], kv["tokenizer.ggml.token_type"]
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.pre"] == "default"
    assert len(tokens) == len(scores) == len(types) == n == kv["llama.vocab_size"]
    assert "tokenizer.ggml.merges" not in kv and "tokenizer.ggml.add_space_prefix" not in kv  # llama.cpp's default: True
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"], kv["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.chat_template"] == CHAT_TEMPLATE
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert types[:3] == [2, 3, 3] and scores[:3] == [0.0, 0.0, 0.0]  # <unk> <s> </s>, as in tokenizer.model
    assert [tokens[i] for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {6}
    assert set(types[259 : len(tok)]) == {1}
    assert "▁" in tokens and all(" " not in t for t in tokens[: len(tok)])
    if name == "llama":  # the proto's scores, as llama.cpp's converter writes them
        sp = spm.SentencePieceProcessor(model_file=str(spm_model))
        assert np.array_equal(np.float32(scores[3:]), np.float32([sp.get_score(i) for i in range(3, len(tok))]))
    else:  # tokenizer.json only: merged tokens score minus their merge rank; padding is unused
        merges = json.loads((checkpoints[name] / "tokenizer.json").read_text())["model"]["merges"]
        first = merges[0] if isinstance(merges[0], str) else "".join(merges[0])
        assert scores[vocab[first.replace(" ", "")]] == 0.0
        assert tokens[len(tok) :] == [f"[PAD{i}]" for i in range(len(tok), n)] and set(types[len(tok) :]) == {5}


def test_spm_added_tokens_and_refusals(tmp_path, hf_tokenizer_dir, spm_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    tok.add_tokens(["<|im_start|>", "my▁word"])  # control (looks special) and user-defined (▁ -> space)
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL]"]})
    ckpt = tmp_path / "added"
    tok.save_pretrained(ckpt)
    shutil.copy(spm_model, ckpt / "tokenizer.model")
    kv = tokenizer_metadata(ckpt, len(tok) + 2)
    tokens, types, scores = (kv[f"tokenizer.ggml.{k}"][0] for k in ("tokens", "token_type", "scores"))
    ids = tok.convert_tokens_to_ids(["<|im_start|>", "my▁word", "[TOOL]"])
    assert [tokens[i] for i in ids] == ["<|im_start|>", "my word", "[TOOL]"] and [types[i] for i in ids] == [3, 4, 3]
    assert [scores[i] for i in ids] == [-1000.0] * 3 and tokens[-2:] == [f"[PAD{len(tok)}]", f"[PAD{len(tok) + 1}]"]

    with pytest.raises(QtuneError, match="vocab_size"):
        tokenizer_metadata(ckpt, len(tok) - 1)
    # a tokenizer.model that no longer matches the tokenizer (another vocabulary)
    other = _train(tmp_path / "other.model", "bpe", 420)
    shutil.copy(other, ckpt / "tokenizer.model")
    with pytest.raises(QtuneError, match="does not match"):
        tokenizer_metadata(ckpt, len(tok))
    # unigram models: llama.cpp's SPM tokenizer would not reproduce their segmentation
    unigram = _train(tmp_path / "uni.model", "unigram", 320)
    shutil.copy(unigram, ckpt / "tokenizer.model")
    with pytest.raises(QtuneError, match="unigram"):
        tokenizer_metadata(ckpt, len(tok))


@needs_llama_cpp_source
def test_spm_tokenizer_keys_equal_convert_hf_to_gguf(exported, checkpoints, tmp_path):
    """With tokenizer.model, the tokenizer keys are llama.cpp's converter's (_set_vocab_sentencepiece)."""
    theirs = convert_with_llama_cpp(checkpoints["llama"], tmp_path / "convert.gguf", "--vocab-only")
    ours, ref = read_gguf_header(exported["llama"])[0], read_gguf_header(theirs)[0]
    ours = {k: v for k, v in ours.items() if k.startswith("tokenizer.")}
    ref = {k: v for k, v in ref.items() if k.startswith("tokenizer.")}
    # we state add_eos_token (False); the converter states add_sep_token (False, llama.cpp's SPM default)
    assert ours.pop("tokenizer.ggml.add_eos_token") is False and ref.pop("tokenizer.ggml.add_eos_token", False) is False
    assert ref.pop("tokenizer.ggml.add_sep_token", False) is False
    assert sorted(ours) == sorted(ref), (sorted(ours), sorted(ref))
    assert [k for k in ours if ours[k] != ref[k]] == []


# ---------------------------------------------------------------- llama.cpp oracles


@needs_llama_cpp
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_spm_tokenize_and_detokenize_like_hf(exported, checkpoints, spm_model, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints[name])
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    llm = _llama(exported[name], vocab_only=True)
    byte_ids = set(range(3, 259))
    used_bytes = False
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 1 and ids[-1] != 2 and ids[1:] == sp.encode(text)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids[1:], text
        used_bytes |= bool(byte_ids & set(ids))
        # llama.cpp's detokenizer drops the dummy-prefix space, as HF's Metaspace decoder does
        assert _detokenize(llm, ids[1:]) == tok.decode(ids[1:]) == text, text
        assert llm.detokenize(ids).decode() == tok.decode(ids, skip_special_tokens=True) == text, text  # after a BOS
    assert used_bytes, "no text went through byte fallback"
    for text in LEADING_SPACE:  # llama.cpp is SentencePiece's tokenizer here, not transformers'
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert ids == [1, *sp.encode(text)] and ids != tok.encode(text), text
        assert _detokenize(llm, ids[1:]) == sp.decode(ids[1:]) == text, text


@needs_llama_cpp
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_spm_logits_match_hf(exported, checkpoints, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints[name])
    ids = tok.encode(" ".join(TEXTS))[:64]
    model = AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    llm = _llama(exported[name])
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    got = got - got.max(-1, keepdims=True)
    got = got - np.log(np.exp(got).sum(-1, keepdims=True))
    kl = (np.exp(ref) * (ref - got)).sum(-1)
    assert kl.mean() <= 1e-4, kl.mean()


@needs_llama_cpp
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_spm_chat_roundtrip(exported, checkpoints, name):
    from transformers import AutoTokenizer

    assert check_chat_roundtrip(exported[name], checkpoints[name]) == []
    tok = AutoTokenizer.from_pretrained(checkpoints[name])
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}], tokenize=False)
    hf_ids = tok.encode(chat, add_special_tokens=False)
    llm = _llama(exported[name], vocab_only=True)
    assert _detokenize(llm, hf_ids, unparse_special=True) == chat
    ids = llm.tokenize(chat.encode(), add_bos=False, special=True)
    assert ids[0] == 1 and ids[-1] == 2  # <s> and </s> parsed as the control tokens
    # llama.cpp's SPM tokenizer puts SentencePiece's dummy-prefix space after every special token (as
    # legacy SentencePiece did: it encodes each text piece on its own); HF (legacy=False) only at the start.
    # The GGUF cannot say otherwise (add_space_prefix is all or nothing), so this is the known difference.
    assert ids == tok.encode(chat.replace("<s>", "<s> "), add_special_tokens=False) != hf_ids
