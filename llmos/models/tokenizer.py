"""Text to token ids and back, and chat messages to prompt text, for one model.

A GGUF carries no tokenizer.json, only the vocabulary, merges and token types under
llama.cpp's key names, so `from_gguf` rebuilds the tokenizer the model was trained with
from those; a Hugging Face directory brings its tokenizer.json. Both end as one
`tokenizers.Tokenizer`, which does the work in Rust.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from llmos.errors import InvalidRequestError, ModelLoadError

# How each llama.cpp pre-tokenizer name splits text before byte-level BPE. SmolLM2 was
# trained with every digit on its own; the others use a regex (None = GPT-2's, built in).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "default": None, "gpt-2": None, "smollm": "digits",
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}

# Tokens that end a chat turn; each counts as a stop token when the chat template uses it.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")

_CONTROL, _USER_DEFINED = 3, 4   # llama.cpp token types


class Tokenizer:
    """A model's tokenizer: encode/decode, its special ids and its chat template."""

    def __init__(self, backend: Backend, bos_token_id: int | None, eos_token_ids: list[int],
                 chat_template: str | None):
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self._chat_template = chat_template

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], source: str) -> Tokenizer:
        """Rebuild the tokenizer a GGUF describes from its `tokenizer.*` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(f"{source}: GGUF has no tokenizer.ggml.tokens; cannot build a tokenizer")
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        pre, scores = meta.get("tokenizer.ggml.pre") or "default", meta.get("tokenizer.ggml.scores")
        if kind not in ("gpt2", "llama"):
            raise ModelLoadError(f"{source}: unsupported tokenizer model {kind!r} (supported: gpt2, llama)")
        if kind == "gpt2" and pre not in _PRE_SPLITS:
            raise ModelLoadError(f"{source}: unsupported pre-tokenizer {pre!r} (supported: {', '.join(_PRE_SPLITS)})")
        if kind == "llama" and (scores is None or len(scores) != len(tokens)):
            raise ModelLoadError(f"{source}: sentencepiece tokenizer needs one tokenizer.ggml.scores entry per token")
        try:
            if kind == "gpt2":
                backend = _byte_level_bpe(tokens, types, meta.get("tokenizer.ggml.merges") or [], pre)
            else:
                backend = _sentencepiece_bpe(tokens, scores, meta.get("tokenizer.ggml.unknown_token_id"),
                                             bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                        for t, ty in zip(tokens, types) if ty == _CONTROL])
            backend.add_tokens([AddedToken(t, special=False, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
        except Exception as e:   # tokenizers rejects e.g. merges naming tokens that are not in the vocabulary
            raise ModelLoadError(f"{source}: invalid tokenizer data: {e}") from None
        # sentencepiece vocabularies get BOS unless the file says otherwise (as in llama.cpp); byte-level ones if asked
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))

        def token_id(key: str) -> int | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return int(i) if i is not None and 0 <= int(i) < len(tokens) else None

        bos, eos = token_id("bos"), token_id("eos")
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        _set_post_processor(backend, bos if add_bos else None, eos if add_eos else None)
        template = meta.get("tokenizer.chat_template")
        stops = [i for i in (eos, token_id("eot"), token_id("eom")) if i is not None]
        return cls(backend, bos, _with_end_of_turn(backend, stops, template), template)

    @classmethod
    def from_hf(cls, tokenizer_json: Path, tokenizer_config: dict, eos_token_ids: list[int],
                chat_template: str | None) -> Tokenizer:
        """A Hugging Face tokenizer.json, with bos/eos and add_bos_token from tokenizer_config.json."""
        if not tokenizer_json.is_file():
            raise ModelLoadError(f"{tokenizer_json.parent}: no tokenizer.json in the model directory")
        try:
            backend = Backend.from_file(str(tokenizer_json))
        except Exception as e:   # tokenizers raises a bare Exception for malformed files
            raise ModelLoadError(f"{tokenizer_json}: cannot read tokenizer: {e}") from None
        bos = _token_id(backend, tokenizer_config.get("bos_token"))
        eos = _token_id(backend, tokenizer_config.get("eos_token"))
        if "add_bos_token" in tokenizer_config or "add_eos_token" in tokenizer_config:
            # transformers rebuilds the post-processor from these flags; they win over tokenizer.json
            _set_post_processor(backend, bos if tokenizer_config.get("add_bos_token") else None,
                                eos if tokenizer_config.get("add_eos_token") else None)
        stops = list(eos_token_ids) + ([eos] if eos is not None else [])
        return cls(backend, bos, _with_end_of_turn(backend, stops, chat_template), chat_template)

    def to_json(self) -> str:
        """Everything needed to rebuild this tokenizer without the model file (for the weight cache)."""
        return json.dumps({"backend": self._backend.to_str(), "bos_token_id": self._bos_token_id,
                           "eos_token_ids": self._eos_token_ids, "chat_template": self._chat_template})

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        d = json.loads(text)
        return cls(Backend.from_str(d["backend"]), d["bos_token_id"], d["eos_token_ids"], d["chat_template"])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special-token text such as "<|im_start|>" always becomes its single id."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(i)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: the model's eos plus the end-of-turn tokens its template uses."""
        return list(self._eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render messages with the model's own Jinja template, sandboxed as transformers does."""
        if not self._chat_template:
            raise InvalidRequestError("this model has no chat template; use a plain completion prompt instead")
        bos = self.id_to_token(self._bos_token_id) if self._bos_token_id is not None else ""
        eos = self.id_to_token(self._eos_token_ids[0]) if self._eos_token_ids else ""
        try:
            return _compile(self._chat_template).render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                bos_token=bos, eos_token=eos)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"messages: the chat template rejected them: {e}") from None

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[int]]:
        """A conversation rendered with the template, opened for the assistant's turn, and its
        token ids (the template writes any special tokens itself). The one chat path."""
        text = self.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        return text, self.encode(text, add_special_tokens=False)


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str], pre: str) -> Backend:
    """GPT-2-style BPE over bytes spelled as printable characters, as llama.cpp's 'gpt2' model."""
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    vocab = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        # A normal token outside the byte alphabet is raw UTF-8 text; respell it so BPE can reach it.
        # Control/user-defined tokens keep their text: they are matched whole, before BPE.
        if ty not in (_CONTROL, _USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    backend = Backend(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges],
                                 continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = _PRE_SPLITS[pre]
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], unk_id: int | None, add_space_prefix: bool) -> Backend:
    """SentencePiece BPE ('llama' model): merges recovered from the token scores, bytes as <0xNN>."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab, _merges_from_scores(vocab, dict(zip(tokens, scores))),
                                 unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens is a merge; higher-scored results merge first."""
    merges = []
    for token, score in scores.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges.extend((left, right, score) for left, right in pairs)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _set_post_processor(backend: Backend, bos: int | None, eos: int | None) -> None:
    """Add BOS/EOS around each encoded text exactly when the model asks for them."""
    if bos is None and eos is None:
        backend.post_processor = None
        return
    pre = [backend.id_to_token(bos)] if bos is not None else []
    post = [backend.id_to_token(eos)] if eos is not None else []
    backend.post_processor = processors.TemplateProcessing(
        single=pre + ["$A"] + post, pair=pre + ["$A"] + post + pre + ["$B:1"] + post,
        special_tokens=list(dict.fromkeys((backend.id_to_token(i), i) for i in (bos, eos) if i is not None)))


def _with_end_of_turn(backend: Backend, eos_ids: list[int], template: str | None) -> list[int]:
    ids = list(eos_ids)
    for tok in _END_OF_TURN:
        i = backend.token_to_id(tok)
        if i is not None and template and tok in template:
            ids.append(i)
    return list(dict.fromkeys(ids))


def _token_id(backend: Backend, token: str | dict | None) -> int | None:
    if isinstance(token, dict):   # transformers writes AddedToken as {"content": ...}
        token = token.get("content")
    return backend.token_to_id(token) if token else None


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
