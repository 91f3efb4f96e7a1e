"""The engine's per-token logprobs in OpenAI's two shapes (chat and legacy completions)."""

from __future__ import annotations

from llmos.outputs import TokenLogprob
from llmos.server.schemas.openai import ChoiceLogprobs, CompletionLogprobs, TopLogprob
from llmos.server.schemas.openai import TokenLogprob as WireTokenLogprob


def _text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, lps: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if lps is None:
        return None
    content = []
    for lp in lps:
        text = _text(tokenizer, lp.token_id)
        top = [TopLogprob(token=_text(tokenizer, i), logprob=v, bytes=list(_text(tokenizer, i).encode()))
               for i, _, v in lp.top_logprobs]
        content.append(WireTokenLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()), top_logprobs=top))
    return ChoiceLogprobs(content=content)


def completion_logprobs(tokenizer, lps: list[TokenLogprob] | None, offset: int = 0) -> CompletionLogprobs | None:
    if lps is None:
        return None
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for lp in lps:
        text = _text(tokenizer, lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({_text(tokenizer, i): v for i, _, v in lp.top_logprobs})
        out.text_offset.append(offset)
        offset += len(text)
    return out
