"""The model -> tool -> model loop, run by the kernel so that an agent (or an HTTP client
with `llmos_execute`) gets a final answer and the trace of calls that led to it.

Each turn the model either answers in text, which ends the loop, or emits one tool call
(grammar-constrained to the tools' schemas by the layer that generates). The call runs
through `call_tool`, which for an agent is the tool.call system call, so every call is
capability-checked and audited like any other. A failed call is not the end: its error
goes back to the model as the tool's result, as OpenAI's function calling does, so the
model can correct itself. After `max_turns` calls the model is asked once more, without
tools, for its answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from llmos.errors import InvalidRequestError, LLMOSError
from llmos.tools.registry import Tool

MAX_TURNS = 16


@dataclass
class TurnOutput:
    """What one generation gave: plain text, or a call (name as the model wrote it)."""
    text: str
    call: dict | None = None          # {"name": str, "arguments": dict}
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = "stop"


@dataclass
class LoopResult:
    text: str
    trace: list[dict] = field(default_factory=list)     # {"name", "arguments", "result" | "error"}
    turns: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = "stop"
    messages: list[dict] = field(default_factory=list)  # the conversation the model saw, calls included

    def to_dict(self) -> dict:
        return {"text": self.text, "trace": self.trace, "turns": self.turns, "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "finish_reason": self.finish_reason}


Generate = Callable[[list[dict], list[dict], object], TurnOutput]   # (messages, function specs, tool_choice)
CallTool = Callable[[str, dict], object]                          # (tool name, arguments) -> result


def function_specs(tools: list[Tool]) -> list[dict]:
    """The tools as OpenAI function definitions (names without dots)."""
    return [{"name": t.function_name, "description": t.description, "parameters": t.parameters} for t in tools]


def check_turns(max_turns) -> int:
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or not 1 <= max_turns <= MAX_TURNS:
        raise InvalidRequestError(f"max_turns: must be an integer from 1 to {MAX_TURNS}, got {max_turns!r}")
    return max_turns


def run(generate: Generate, call_tool: CallTool, messages: list[dict], tools: list[Tool], *,
        max_turns: int = 4, tool_choice="auto") -> LoopResult:
    """`tool_choice` applies to the first turn ("auto", "required", or a tool name to force
    that call); later turns are "auto", so a forced call does not force a loop."""
    max_turns = check_turns(max_turns)
    by_function = {t.function_name: t for t in tools}
    specs = function_specs(tools)
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "required", "none"):
        forced = by_function.get(tool_choice.replace(".", "_"))
        if forced is None:
            raise InvalidRequestError(f"tool_choice: {tool_choice!r} is not one of the tools given")
        tool_choice = {"type": "function", "function": {"name": forced.function_name}}
    messages = [dict(m) for m in messages]
    result = LoopResult(text="", messages=messages)
    choice = tool_choice
    while True:
        last = result.turns >= max_turns
        out = generate(messages, [] if last else specs, "none" if last else choice)
        result.turns += 1
        result.prompt_tokens += out.prompt_tokens
        result.output_tokens += out.output_tokens
        if out.call is None:
            result.text, result.finish_reason = out.text, out.finish_reason
            return result
        tool = by_function.get(out.call["name"])
        name = tool.name if tool else out.call["name"]
        step = {"name": name, "arguments": out.call.get("arguments", {})}
        try:
            step["result"] = call_tool(name, step["arguments"])
        except LLMOSError as e:
            step["error"] = {"kind": type(e).__name__ if not hasattr(e, "kind") else e.kind, "message": str(e)}
        result.trace.append(step)
        messages.append({"role": "assistant", "content": json.dumps(
            {"name": out.call["name"], "arguments": step["arguments"]}, ensure_ascii=False)})
        shown = step["result"] if "result" in step else {"error": step["error"]["message"]}
        messages.append({"role": "tool", "content": json.dumps(shown, ensure_ascii=False, default=str)})
        choice = "auto"
