"""Training records to token ids and a loss mask.

A training file is JSON Lines, one record a line, in either of OpenAI's fine-tuning shapes:

  {"messages": [{"role": "system" | "user" | "assistant", "content": "...", "weight": 0 | 1}, ...]}
      rendered with the model's own chat template, each assistant turn cut out exactly as
      serving would see it (the prompt up to "<|im_start|>assistant\\n" is encoded the way the
      chat endpoint encodes a prompt). The loss covers each assistant turn's tokens and its
      end-of-turn token; nothing a user or the system wrote, and no turn with "weight": 0.
  {"prompt": "...", "completion": "..."}
      plain text, as /v1/completions sees it; the loss covers the completion and EOS.

Every problem is an InvalidRequestError that names the line and the reason.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmos.errors import InvalidRequestError
from llmos.models.tokenizer import Tokenizer

IGNORE = -100                  # the label of a position the loss does not look at (torch's default)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]          # the token to predict at each position, IGNORE where the loss skips it
    line: int                  # where it came from, for messages
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def parse_jsonl(text: str, source: str = "data") -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; the first bad line is an error."""
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{source} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        records.append((n, rec))
    if not records:
        raise InvalidRequestError(f"{source}: no records (expected JSON Lines, one training example a line)")
    return records


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InvalidRequestError(f"data: {p} does not exist") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"data: {p} is a directory, not a JSONL file") from None
    except OSError as e:
        raise InvalidRequestError(f"data: cannot read {p}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InvalidRequestError(f"{p} line {line}: not UTF-8 text") from None
    return parse_jsonl(text, str(p))


def check_record(rec, where: str) -> dict:
    """The record itself if it has one of the two shapes and something to learn from."""
    if not isinstance(rec, dict):
        raise InvalidRequestError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InvalidRequestError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"{where}: messages[{i}] must be {{'role': one of {', '.join(ROLES)}, "
                                          f"'content': a string}}, got {json.dumps(m)[:80]}")
            if "weight" in m and m["weight"] not in (0, 1):
                raise InvalidRequestError(f"{where}: messages[{i}].weight must be 0 or 1, got {m['weight']!r}")
        if not any(m["role"] == "assistant" and m.get("weight", 1) for m in msgs):
            raise InvalidRequestError(f"{where}: no assistant message to learn from (the loss covers only "
                                      "what the assistant says)")
        return rec
    if "prompt" in rec or "completion" in rec:
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str):
                raise InvalidRequestError(f"{where}: '{key}' must be a string")
        if not rec["completion"]:
            raise InvalidRequestError(f"{where}: 'completion' is empty; nothing to learn from")
        return rec
    raise InvalidRequestError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"completion\": ...}}, "
                              f"got keys {sorted(rec)[:8]}")


def encode_record(rec: dict, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of one checked record."""
    if "messages" not in rec:
        prompt = tokenizer.encode(rec["prompt"])
        completion = tokenizer.encode(rec["completion"], add_special_tokens=False) + tokenizer.eos_token_ids[:1]
        return prompt + completion, [IGNORE] * len(prompt) + completion
    msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    last = max(i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant" and m.get("weight", 1))
    ids: list[int] = []
    labels: list[int] = []
    done = ""                      # the text encoded so far
    ends = set(tokenizer.eos_token_ids)
    for i, m in enumerate(rec["messages"][:last + 1]):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise InvalidRequestError("the model's chat template does not render a conversation as its "
                                      "prefix plus the new turn; train with prompt/completion records instead")
        head = tokenizer.encode(prompt[len(done):], add_special_tokens=False)
        turn = tokenizer.encode(full[len(prompt):], add_special_tokens=False)
        # learn the turn up to its end-of-turn token; what follows (a newline) opens the next turn
        stop = max((k for k, t in enumerate(turn) if t in ends), default=len(turn) - 1) + 1
        learn = bool(m.get("weight", 1))
        ids += head + turn
        labels += [IGNORE] * len(head) + [t if learn else IGNORE for t in turn[:stop]] + [IGNORE] * (len(turn) - stop)
        done = full
    return ids, labels


def build_examples(records: list[tuple[int, dict]], tokenizer: Tokenizer, max_len: int, *,
                   truncate: bool = False, source: str = "data",
                   name: Callable[[int], str] | None = None) -> list[Example]:
    """Checked, encoded examples. One longer than `max_len` tokens is refused, or with
    `truncate` cut to its first `max_len` tokens (refused still if nothing to learn is left).
    `name(n)` names record n in messages (default: "SOURCE line N")."""
    out = []
    for n, rec in records:
        where = name(n) if name else f"{source} line {n}"
        ids, labels = encode_record(check_record(rec, where), tokenizer)
        cut = len(ids) > max_len
        if cut and not truncate:
            raise InvalidRequestError(f"{where}: {len(ids)} tokens, more than max_len {max_len}; shorten it, "
                                      "raise --max-len, or pass --truncate to cut long examples")
        if cut:
            ids, labels = ids[:max_len], labels[:max_len]
            if all(t == IGNORE for t in labels[1:]):
                raise InvalidRequestError(f"{where}: cut to max_len {max_len} tokens it keeps nothing of the "
                                          "assistant's answer; raise --max-len")
        out.append(Example(ids, labels, n, cut))
    return out


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random held-out split; at least one example on each side when there are two."""
    if val_fraction <= 0 or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    k = min(len(examples) - 1, max(1, round(len(examples) * val_fraction)))
    held = set(order[:k])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


@dataclass
class Batch:
    input_ids: torch.Tensor        # [B, T], right-padded
    attention_mask: torch.Tensor   # [B, T], 1 for real tokens
    targets: torch.Tensor          # [B, T-1]: the next token to predict after each position, or IGNORE

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return Batch(ids, mask, labels[:, 1:])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order examples are seen in an epoch: a function of (seed, epoch) alone, so a resumed
    run sees the rest of the epoch it stopped in exactly as the uninterrupted one would."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
