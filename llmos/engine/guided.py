"""Grammar-constrained decoding: a `Guide` per request masks every logits row to the tokens
its grammar allows next, so JSON-schema, regex and grammar outputs always parse.

The grammar engine is xgrammar, chosen by measured per-token cost on this CPU with the
default model's tokenizer (benchmarks/guided.py, docs/benchmarks.md "Serving"): 4-5 us to
compute a mask and about 2 us to accept a token, against 5-13 us and 3-4 us for llguidance
and 14-37 us (plus 1.4 us) for outlines-core, which also compiles schemas 6-1000x slower.
Compiled grammars are immutable and shared by every request with the same spec (LRU).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from llmos.errors import InvalidRequestError
from llmos.sampling_params import GUIDED_KINDS

_CACHE_SIZE = 256
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_XGR_LOCATION = re.compile(r"^\[[\d:.]+\] \S+:\d+: ")   # xgrammar prefixes errors with its C++ source line


@dataclass(frozen=True)
class JsonBounds:
    """Limits put on what a JSON schema leaves unbounded, so that output cut by a sensible
    max_tokens still ends as valid JSON: an integer or number without minimum/maximum gets
    +-(10**max_digits - 1), a string without maxLength (or enum, const, pattern, format)
    gets max_string_length characters."""
    max_digits: int = 15
    max_string_length: int = 256

    def apply(self, schema):
        """A bounded copy of schema (the caller's stays as it was)."""
        return self._walk(copy.deepcopy(schema))

    def _walk(self, node):
        if isinstance(node, list):
            return [self._walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        for key, value in node.items():
            if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
                node[key] = {k: self._walk(v) for k, v in value.items()}
            elif key in ("items", "additionalProperties", "prefixItems", "anyOf", "oneOf", "allOf", "not"):
                node[key] = self._walk(value)
        types = node.get("type")
        types = set(types) if isinstance(types, list) else {types}
        free = not ({"enum", "const"} & node.keys())
        if free and types & {"integer", "number"} and not ({"minimum", "maximum", "exclusiveMinimum",
                                                             "exclusiveMaximum"} & node.keys()):
            node["minimum"], node["maximum"] = -(10 ** self.max_digits - 1), 10 ** self.max_digits - 1
        if free and "string" in types and not ({"maxLength", "pattern", "format"} & node.keys()):
            node["maxLength"] = self.max_string_length
        return node


def _xgr():
    # Imported on first use: xgrammar pulls in triton and pydantic, which servers need but scripts may not.
    import xgrammar
    return xgrammar


class Guide:
    """One request's position in its grammar."""

    def __init__(self, compiled, vocab_size: int) -> None:
        xgr = _xgr()
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size
        self._rejected = False

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the logits of every token the grammar forbids next to -inf (in place, CPU)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        if logits.shape[0] > self._vocab_size:   # ids past the tokenizer's vocabulary are padding
            logits[self._vocab_size:] = float("-inf")
        _xgr().apply_token_bitmask_inplace(logits[: self._vocab_size].view(1, -1), self._bitmask)

    def accept(self, token_id: int) -> None:
        # A masked token can only be sampled when nothing was allowed; ending the request then
        # beats failing the whole batch's step.
        if not self._matcher.accept_token(token_id):
            self._rejected = True

    def is_terminated(self) -> bool:
        return self._rejected or self._matcher.is_terminated()


class CompiledGuide:
    """A spec compiled against one tokenizer; `new_guide()` starts a request at its root."""

    def __init__(self, compiled, vocab_size: int) -> None:
        self._compiled = compiled
        self._vocab_size = vocab_size

    def new_guide(self) -> Guide:
        return Guide(self._compiled, self._vocab_size)


class _Compiler:
    """xgrammar's compiler for one tokenizer plus the LRU of specs compiled with it."""

    def __init__(self, tokenizer) -> None:
        xgr = _xgr()
        n = tokenizer.vocab_size
        # Special tokens spelled as "" are never allowed by xgrammar, except the stop tokens.
        vocab = [tokenizer.id_to_token(i) if tokenizer.decode([i]) else "" for i in range(n)]
        if any(_BYTE_FALLBACK.fullmatch(t) for t in vocab):
            kind, prefix_space = xgr.VocabType.BYTE_FALLBACK, True     # sentencepiece: "▁word", "<0x0A>"
        else:
            kind, prefix_space = xgr.VocabType.BYTE_LEVEL, False       # GPT-2 style: "Ġword"
        info = xgr.TokenizerInfo(vocab, kind, vocab_size=n, stop_token_ids=tokenizer.eos_token_ids,
                                 add_prefix_space=prefix_space)
        self.vocab_size = n
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.cache: OrderedDict[str, CompiledGuide] = OrderedDict()
        self.lock = threading.Lock()

    def compile(self, spec: dict, bounds: JsonBounds) -> CompiledGuide:
        key = json.dumps([spec, bounds.max_digits, bounds.max_string_length], sort_keys=True)
        with self.lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                return hit
        compiled = CompiledGuide(self._compile(spec, bounds), self.vocab_size)
        with self.lock:
            self.cache[key] = compiled
            while len(self.cache) > _CACHE_SIZE:
                self.cache.popitem(last=False)
        return compiled

    def _compile(self, spec: dict, bounds: JsonBounds):
        if not isinstance(spec, dict) or len(spec) != 1:
            raise InvalidRequestError(f"guided: must have exactly one of {', '.join(GUIDED_KINDS)}; got {spec!r:.200}")
        (kind, value), = spec.items()
        if kind in ("json_schema", "text_or_json_schema"):
            value = json.dumps(bounds.apply(check_json_schema(value)))
        elif kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise InvalidRequestError(f"guided.{kind}: must be a non-empty string")
        try:
            if kind == "json_object":
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "json_schema":
                return self.compiler.compile_json_schema(value, any_whitespace=False)
            if kind == "text_or_json_schema":
                xgr = _xgr()
                return self.compiler.compile_grammar(xgr.Grammar.union(
                    xgr.Grammar.from_regex(r"([^{\s][\s\S]*)?"), xgr.Grammar.from_json_schema(value, any_whitespace=False)))
            if kind == "regex":
                return self.compiler.compile_regex(value)
            if kind == "grammar":
                # xgrammar's EBNF names rules with "::="; anything else is read as Lark.
                if "::=" in value:
                    return self.compiler.compile_grammar(value)
                return self.compiler.compile_grammar(_xgr().Grammar.from_lark(value))
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequestError(f"guided.{kind}: {_XGR_LOCATION.sub('', str(e)).strip()}") from None
        raise InvalidRequestError(f"guided: unknown kind {kind!r}; use one of {', '.join(GUIDED_KINDS)}")


def check_json_schema(schema) -> dict:
    """The schema as a dict, or InvalidRequestError saying what is wrong with it."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InvalidRequestError(f"json_schema: not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"json_schema: must be a JSON object, got {type(schema).__name__}")
    from jsonschema import SchemaError, validators
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "(root)"
        raise InvalidRequestError(f"json_schema: invalid at {where}: {e.message}") from None
    return schema


def text_or_json_spec(schema: dict) -> dict:
    """A spec for output that is either plain text (not starting with "{") or one JSON value
    valid under `schema`; the first character decides. Lets a model choose between answering
    and calling a tool while any call it makes is still schema-valid."""
    return {"text_or_json_schema": check_json_schema(schema)}


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # tokenizer -> _Compiler
_compilers_lock = threading.Lock()


def compile_guide(spec: dict, tokenizer, bounds: JsonBounds = JsonBounds()) -> CompiledGuide:
    """Compile (or fetch from the LRU) a guided spec for this tokenizer, JSON schemas bounded
    by `bounds`; InvalidRequestError if the spec is malformed. Safe to call from any thread."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = _Compiler(tokenizer)
    return compiler.compile(spec, bounds)
