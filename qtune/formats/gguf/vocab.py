"""The tokenizer as GGUF metadata (BPE and SentencePiece vocabularies, pre-tokenizer, special tokens,
chat template), and the check that a written file's chat template and stop tokens match training's."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType

from qtune.errors import QtuneError
from qtune.formats.gguf.reader import read_gguf_header

Q = GGMLQuantizationType


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
        raise QtuneError(f"{tokenizer_json}: the GGUF export supports byte-level BPE (GPT-2 style) and SentencePiece BPE tokenizers, got {model.get('type')}")
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
    kv[K.ADD_BOS] = (adds_token(tokenizer, tokenizer.bos_token_id, first=True), V.BOOL, None)
    kv[K.ADD_EOS] = (adds_token(tokenizer, tokenizer.eos_token_id, first=False), V.BOOL, None)
    if isinstance(tokenizer.chat_template, str):
        kv[K.CHAT_TEMPLATE] = (tokenizer.chat_template, V.STRING, None)
    return kv


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


def _sentencepiece_vocab_kv(checkpoint_dir: Path, tokenizer, vocab: dict[str, int], vocab_size: int, model: dict, tokenizer_def: dict) -> dict[str, tuple]:
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
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


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


def adds_token(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0 if first else -1] == token_id and ids != tokenizer.encode("a", add_special_tokens=False)


def clip(text) -> str:
    return repr(text if text is None or len(text) < 60 else text[:57] + "...")


def check_chat_roundtrip(gguf_path: Path, tokenizer_dir: Path) -> list[str]:
    """Problems (empty if none) between the GGUF's chat template / special tokens and the HF tokenizer's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    kv, _ = read_gguf_header(Path(gguf_path))
    value = kv.get

    problems = []
    template, expected_template = value("tokenizer.chat_template"), tokenizer.chat_template
    if template != expected_template:
        problems.append(f"chat template differs: GGUF has {clip(template)}, tokenizer has {clip(expected_template)}")
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
    add_bos = adds_token(tokenizer, tokenizer.bos_token_id, first=True)
    if value("tokenizer.ggml.add_bos_token") != add_bos:
        problems.append(f"add_bos_token: GGUF has {value('tokenizer.ggml.add_bos_token')}, tokenizer adds BOS: {add_bos}")
    return problems
