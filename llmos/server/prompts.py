"""Request bodies to engine inputs: chat messages rendered with the model's template (tools
included), completion prompts tokenized, and OpenAI's sampling fields as SamplingParams."""

from __future__ import annotations

from llmos.sampling_params import MIN_TOP_P, SamplingParams
from llmos.server.errors import bad_request
from llmos.server.schemas.openai import AssistantTurn, ChatMessage, JsonObjectFormat, JsonSchemaFormat, SamplingFields
from llmos.server.tools import ToolPlan, call_text, system_prompt


def chat_prompt(tokenizer, messages: list[ChatMessage], tools: ToolPlan | None) -> list[int]:
    """Token ids of the conversation plus the assistant's turn opening. Blocking (tokenizes)."""
    msgs = []
    for m in messages:
        content = m.text()
        if isinstance(m, AssistantTurn) and m.tool_calls:
            calls = "\n".join(call_text(c) for c in m.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    template_tools = None
    if tools is not None:
        if "tools" in (tokenizer.chat_template or ""):
            template_tools = [t.model_dump(exclude_none=True) for t in tools.tools]
        elif msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": f"{msgs[0]['content']}\n\n{system_prompt(tools)}"}
        else:
            msgs.insert(0, {"role": "system", "content": system_prompt(tools)})
    return tokenizer.encode_chat(msgs, tools=template_tools)[1]


def completion_prompts(tokenizer, prompt) -> list[list[int]]:
    """Each prompt of a completions request (text or token ids) as token ids. Blocking."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def response_format_spec(fmt) -> dict | None:
    if isinstance(fmt, JsonObjectFormat):
        return {"json_object": True}
    if isinstance(fmt, JsonSchemaFormat):
        return {"json_schema": fmt.json_schema.schema_}
    return None


def sampling_params(body: SamplingFields, *, max_tokens: int | None, prompt_len: int, max_model_len: int,
                    default_max_tokens: int, logprobs: int | None = None, guided: dict | None = None,
                    choice: int = 0) -> SamplingParams:
    """One choice's SamplingParams. Without max_tokens a request may use what the context
    leaves, up to the server's default; choice i of a seeded request uses seed + i, so the
    choices differ but each is reproducible."""
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens, max_model_len - prompt_len))
    elif max_tokens > max_model_len:
        raise bad_request(f"max_tokens: {max_tokens} is more than the model's context of {max_model_len} tokens",
                          "max_tokens")
    seed = None if body.seed is None else (body.seed + choice) % 2**63
    top_p = body.top_p or MIN_TOP_P   # OpenAI's top_p 0: only the likeliest token
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=top_p, top_k=body.top_k, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=seed, stop=body.stop, ignore_eos=body.ignore_eos,
        logprobs=logprobs, guided=guided)
