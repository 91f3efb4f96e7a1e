"""Function calling. A tool call is generated as one JSON object, {"name": ..., "arguments":
{...}}, under grammar constraints built from the tools' parameter schemas:

- tool_choice "required" / a named function: the whole output must be a call (to any of
  the tools / to that one);
- "auto" (the default with tools): the first character decides, "{" starts a call that is
  then held to the schemas, anything else is a plain-text answer;
- "none": the tools are neither shown to the model nor callable.

Models whose chat template renders `tools` get them that way; for the others (SmolLM2)
the tools and the call format are described in the system message."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from llmos.engine.guided import check_json_schema, text_or_json_spec
from llmos.errors import InvalidRequestError
from llmos.server.errors import bad_request
from llmos.server.schemas.openai import FunctionCall, NamedToolChoice, Tool, ToolCall, ToolCallDelta

_CALL_PREFIX = re.compile(r'\{"name": "([A-Za-z0-9_-]+)", "arguments": ')


@dataclass
class ToolPlan:
    """What a request's tools and tool_choice mean for prompt and decoding."""
    tools: list[Tool]
    mode: str                                 # "auto" | "required" | "named"
    guided: dict = field(default_factory=dict)

    @property
    def forced(self) -> bool:
        return self.mode != "auto"


def plan(tools: list[Tool] | None, choice) -> ToolPlan | None:
    if not tools or choice == "none":
        return None
    for i, t in enumerate(tools):
        if t.function.parameters is not None:
            try:
                check_json_schema(t.function.parameters)
            except InvalidRequestError as e:
                raise bad_request(f"tools[{i}].function.parameters: {str(e).partition(': ')[2]}",
                                  f"tools[{i}].function.parameters") from None
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        return ToolPlan(tools, "named", {"json_schema": _calls_schema(chosen)})
    if choice == "required":
        return ToolPlan(tools, "required", {"json_schema": _calls_schema(tools)})
    return ToolPlan(tools, "auto", text_or_json_spec(_calls_schema(tools)))


def _calls_schema(tools: list[Tool]) -> dict:
    calls = [{"type": "object",
              "properties": {"name": {"const": t.function.name},
                             "arguments": t.function.parameters or {"type": "object", "properties": {}}},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def system_prompt(p: ToolPlan) -> str:
    """Tools described for a model whose template has no place for them."""
    specs = json.dumps([t.function.model_dump(exclude_none=True) for t in p.tools], ensure_ascii=False)
    how = ('To call a function, reply with only a JSON object: {"name": <function name>, "arguments": '
           '<arguments object>}.')
    if p.mode == "auto":
        how += " If no function is needed, answer the user normally instead."
    else:
        how = "You must call a function. " + how
    return f"You can call these functions:\n{specs}\n{how}"


def call_text(call: ToolCall) -> str:
    """An earlier call as the model would have written it (for assistant messages in history)."""
    try:
        args = json.loads(call.function.arguments)
    except ValueError:
        args = call.function.arguments
    return json.dumps({"name": call.function.name, "arguments": args}, ensure_ascii=False)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_call(text: str) -> ToolCall | None:
    """The tool call a finished output holds, or None if it is plain text (or cut short)."""
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(name=obj["name"], arguments=json.dumps(
        obj["arguments"], ensure_ascii=False)))


class CallStream:
    """Turns one choice's streamed text into OpenAI deltas: plain text passes through as
    content; a call is sent as its name, then its arguments as they are generated."""

    def __init__(self, plan: ToolPlan) -> None:
        self.is_call: bool | None = True if plan.forced else None
        self.buffer = ""
        self.call_id: str | None = None
        self.sent = 0                      # characters of the arguments already sent

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(content, tool call deltas) to send for this piece of output."""
        if not text:
            return "", []
        if self.is_call is None:
            self.is_call = text.startswith("{")
        if not self.is_call:
            return text, []
        self.buffer += text
        return "", self._deltas(final=False)

    def finish(self) -> list[ToolCallDelta]:
        return self._deltas(final=True) if self.is_call else []

    def _deltas(self, final: bool) -> list[ToolCallDelta]:
        out = []
        m = _CALL_PREFIX.match(self.buffer)
        if m is None:
            return out
        if self.call_id is None:
            self.call_id = new_call_id()
            out.append(ToolCallDelta(index=0, id=self.call_id, type="function",
                                     function={"name": m.group(1), "arguments": ""}))
        args = self.buffer[m.end():]
        # The object's closing "}" is not part of the arguments: hold the last character back
        # until the end, when a complete call is known to end with it.
        end = len(args) - 1 if not final or parse_call(self.buffer) is not None else len(args)
        if end > self.sent:
            out.append(ToolCallDelta(index=0, function={"arguments": args[self.sent:end]}))
            self.sent = end
        return out

    @property
    def called(self) -> bool:
        return self.call_id is not None and parse_call(self.buffer) is not None
