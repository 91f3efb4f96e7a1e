"""Streaming text: token ids into text deltas, and stop strings caught across deltas."""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded ahead of the first output token, so its leading space comes out right.
_PROMPT_CONTEXT = 5
# A UTF-8 character has at most 4 bytes, so a U+FFFD still pending after more tokens than that
# comes from bytes that are invalid for good; it is emitted rather than held forever.
_MAX_PENDING_TOKENS = 4


class Decoder(Protocol):
    """All the detokenizer needs of a tokenizer; transformers' and llmos' own both fit."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a request's output tokens into text deltas, decoding only a short window per push.

    The window starts one emitted chunk back (vLLM's prefix_offset/read_offset scheme), because
    some tokenizers decode the first token of a sequence differently (SentencePiece drops its
    leading space). Byte-level BPE can split a character across tokens; the decode then ends in
    U+FFFD, and that tail is held back until a later token completes it.
    """

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._window = list(prompt_token_ids or [])[-_PROMPT_CONTEXT:]
        self._read = len(self._window)                    # window tokens up to the last clean cut
        self._emitted = len(self._decode(self._window))   # window chars already handed out
        self._pending = 0                                  # tokens pushed while only U+FFFD grew
        self.text = ""

    def push(self, token_ids: list[int]) -> str:
        """The text the new tokens complete; never a partial character."""
        if not token_ids:
            return ""
        self._window.extend(token_ids)
        return self._advance(len(token_ids), final=False)

    def flush(self) -> str:
        """Whatever is still held back, for when the request ends on incomplete bytes."""
        return self._advance(0, final=True)

    def _advance(self, new_tokens: int, final: bool) -> str:
        text = self._decode(self._window)
        end = len(text.rstrip(_REPLACEMENT))
        if end > self._emitted:
            self._pending = 0
        else:
            self._pending += new_tokens
        if final or self._pending > _MAX_PENDING_TOKENS:
            end = len(text)
        delta = text[self._emitted:end]
        if delta:
            self._emitted = end
            self.text += delta
        if end == len(text):
            self._window = self._window[self._read:]
            self._read = len(self._window)
            self._emitted = len(self._decode(self._window))
            self._pending = 0
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


class StopChecker:
    """Finds stop strings in streamed text, so that no emitted text ever holds part of one.

    Generation stops as soon as the text holds any stop string; the output ends before the
    earliest one found. A tail that could still grow into a stop string is held back until
    the next delta settles it, or until flush() when the request ends for another reason.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        self._stop = list(stop)
        self._include = include_stop_str_in_output
        self._held = ""

    def feed(self, delta: str) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string matched or None)."""
        text, self._held = self._held + delta, ""
        hits = [(at, s) for s in self._stop if (at := text.find(s)) >= 0]
        if hits:
            at, s = min(hits, key=lambda hit: hit[0])
            return text[:at + len(s) if self._include else at], s
        safe = len(text) - self._partial_stop_len(text)
        self._held = text[safe:]
        return text[:safe], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
