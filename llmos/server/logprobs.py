"""The engine's per-token logprobs (token text included) in OpenAI's two shapes (chat and
legacy completions)."""

from __future__ import annotations

from llmos.outputs import TokenLogprob
from llmos.server.schemas.openai import ChoiceLogprobs, CompletionLogprobs, TopLogprob
from llmos.server.schemas.openai import TokenLogprob as WireTokenLogprob


def chat_logprobs(lps: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if lps is None:
        return None
    return ChoiceLogprobs(content=[
        WireTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()),
                         top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode()))
                                       for _, t, v in lp.top_logprobs])
        for lp in lps])


def completion_logprobs(lps: list[TokenLogprob] | None, offset: int = 0) -> CompletionLogprobs | None:
    if lps is None:
        return None
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for lp in lps:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({t: v for _, t, v in lp.top_logprobs})
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out
