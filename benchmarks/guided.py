"""Per-token cost of grammar-constrained decoding with each candidate grammar engine
(xgrammar, llguidance, outlines-core) on the default model's tokenizer, on CPU.

Each engine walks the same token sequences (valid JSON documents as the model's tokenizer
splits them) and, at every token, computes the mask of allowed tokens into a bitmask and
accepts the token; applying a bitmask to the logits row costs the same whichever engine
filled it and is reported once. Engines take turns within each repetition, so drift in the
machine's load hits them alike; the median over repetitions is reported.

    python benchmarks/guided.py [--reps 7] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_section  # noqa: E402

from llmos.models.loader import load_model  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "tags", "address", "role"], "additionalProperties": False}
TOOL_CALL = {
    "type": "object",
    "properties": {"name": {"const": "send_email"},
                   "arguments": {"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
                                 "required": ["to", "body"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False}
CASES = [
    ("nested object (enum, pattern, array)", PERSON,
     {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"],
      "address": {"city": "London", "zip": "12345"}, "role": "admin"}),
    ("tool call, long free-text argument", TOOL_CALL,
     {"name": "send_email", "arguments": {"to": "bob@example.com", "body": (
         "Hi Bob, the quarterly numbers are in and they look better than we feared. Revenue grew "
         "eleven percent, costs stayed flat, and the new region broke even two months early. "
         "Let's meet on Thursday to plan the next steps. Best, Alice")}}),
    ("json_object (any object)", {"type": "object"},
     {"id": 7, "ok": True, "items": [1.5, 2, {"k": None}], "note": "plain text here"}),
]


def token_bytes(tok) -> tuple[list[bytes], set[int]]:
    """Each token's bytes (byte-level BPE spelling undone) and the ids of special tokens."""
    from llmos.models.tokenizer import _bytes_to_unicode
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    special = {i for i in range(tok.vocab_size) if tok.decode([i]) == ""}
    return [bytes(inverse[c] for c in tok.id_to_token(i)) for i in range(tok.vocab_size)], special


class XGrammar:
    def __init__(self, tok) -> None:
        import xgrammar as xgr
        self.xgr = xgr
        vocab = [tok.id_to_token(i) if tok.decode([i]) else "" for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=tok.vocab_size,
                                 stop_token_ids=tok.eos_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        m = self.xgr.GrammarMatcher(compiled)
        return lambda ptr_tensor: m.fill_next_token_bitmask(ptr_tensor.view(1, -1)), m.accept_token


class LLGuidance:
    def __init__(self, tok) -> None:
        import llguidance as llg
        self.llg = llg
        self.tok = llg.LLTokenizer(json.loads(tok.to_json())["backend"], n_vocab=tok.vocab_size,
                                   eos_token=tok.eos_token_ids)

    def compile(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        self.llg.LLMatcher(self.tok, grammar)   # construction is where llguidance compiles
        return grammar

    def matcher(self, grammar):
        m = self.llg.LLMatcher(self.tok, grammar)
        return lambda t: m.unsafe_compute_mask_ptr(t.data_ptr(), t.numel() * 4), m.consume_token


class OutlinesCore:
    def __init__(self, tok) -> None:
        import outlines_core as oc
        self.oc = oc
        vocab, special = token_bytes(tok)
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if i not in special:
                by_bytes.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(tok.eos_token_ids[0], by_bytes)

    def compile(self, schema):
        return self.oc.Index(self.oc.json_schema.build_regex_from_schema(json.dumps(schema), r"[ ]?"), self.vocab)

    def matcher(self, index):
        g = self.oc.Guide(index)
        return lambda t: g.write_mask_into(t.data_ptr(), t.numel(), 4), lambda i: g.advance(i, return_tokens=False)


def walk(engine, compiled, ids: list[int], vocab_size: int) -> tuple[float, float]:
    """Seconds per token spent computing masks and accepting tokens along one document."""
    fill, accept = engine.matcher(compiled)
    bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    t_mask = t_accept = 0.0
    for t in ids:
        t0 = time.perf_counter()
        fill(bitmask)
        t1 = time.perf_counter()
        assert (int(bitmask[t // 32]) >> (t % 32)) & 1, f"{type(engine).__name__} rejects a valid token"
        accept(t)
        t_accept += time.perf_counter() - t1
        t_mask += t1 - t0
    return t_mask / len(ids), t_accept / len(ids)


def apply_cost(vocab_size: int, reps: int = 200) -> float:
    """Seconds to apply one bitmask to a float32 logits row, as llmos does (xgrammar's CPU
    kernel); the same whichever engine filled the bitmask."""
    import xgrammar as xgr
    logits = torch.randn(1, vocab_size)
    bitmask = torch.randint(-2**31, 2**31 - 1, (1, (vocab_size + 31) // 32), dtype=torch.int32)
    t0 = time.perf_counter()
    for _ in range(reps):
        xgr.apply_token_bitmask_inplace(logits, bitmask)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--write", action="store_true", help="add the results to docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = load_model("smollm2-135m").tokenizer
    engines, setup = {}, {}
    for name, cls in (("xgrammar", XGrammar), ("llguidance", LLGuidance), ("outlines-core", OutlinesCore)):
        t0 = time.perf_counter()
        engines[name] = cls(tok)
        setup[name] = time.perf_counter() - t0
    compiled, compile_s = {}, {}
    for name, eng in engines.items():
        for label, schema, _ in CASES:
            t0 = time.perf_counter()
            compiled[name, label] = eng.compile(schema)
            compile_s[name, label] = time.perf_counter() - t0
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in compiled}
    for _ in range(args.reps):
        for label, _, doc in CASES:
            ids = tok.encode(json.dumps(doc), add_special_tokens=False)
            for name, eng in engines.items():
                samples[name, label].append(walk(eng, compiled[name, label], ids, tok.vocab_size))
    lines = ["tokenizer setup (s): " + ", ".join(f"{n} {s:.2f}" for n, s in setup.items()),
             f"applying a bitmask to one logits row: {apply_cost(tok.vocab_size) * 1e6:.0f} us (any engine)", "",
             "| case | tokens | engine | compile (ms) | mask (us/token) | accept (us/token) | total (us/token) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, _, doc in CASES:
        n = len(tok.encode(json.dumps(doc), add_special_tokens=False))
        for name in engines:
            mask = statistics.median(m for m, _ in samples[name, label]) * 1e6
            acc = statistics.median(a for _, a in samples[name, label]) * 1e6
            lines.append(f"| {label} | {n} | {name} | {compile_s[name, label] * 1e3:.1f} | {mask:.1f} | {acc:.1f} | "
                         f"{mask + acc:.1f} |")
    totals = {name: statistics.mean(statistics.median(m + a for m, a in samples[name, label]) for label, _, _ in CASES)
              for name in engines}
    lines += ["", "Mean per-token cost (mask + accept) over the cases: " + ", ".join(
        f"{name} {t * 1e6:.1f} us" for name, t in sorted(totals.items(), key=lambda kv: kv[1])) + "."]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section("Serving: grammar engines", ".venv/bin/python benchmarks/guided.py --write",
                      "Per-token cost of constrained decoding on the default model's tokenizer (vocabulary "
                      "49152), CPU, median of " + str(args.reps) + " walks over each document.\n\n" + report)

if __name__ == "__main__":
    main()
