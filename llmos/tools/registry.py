"""The function library: tools an agent or a chat can call, each described by a JSON schema.

A tool is a plain Python function. Its type hints and docstring are its contract: pydantic
turns the signature into a model, the model into the JSON schema the LLM sees, and the same
model validates every call's arguments before the function runs, so a model that invents an
argument or gets a type wrong gets an error that says which field and why, never a crash
inside the tool. Tools come from code (`@llmos.tool`), from modules the config lists, and
from MCP servers (see `mcp.py`); all land in one `ToolRegistry` under one name space.

A function may take a first parameter named `ctx` (annotated `ToolContext`): the kernel
fills it with who is calling (tenant, pid), so tools such as fs.* and memory.* act for the
caller and only within the caller's sandbox. `ctx` is never part of the schema.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import pydantic

from llmos.errors import InvalidRequestError, LLMOSError

TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*")
MAX_NAME = 128


class ToolError(LLMOSError):
    """A tool call failed: the tool raised, timed out, or its server is gone. The message
    is what the caller (a model or a program) is told."""


class NoSuchTool(InvalidRequestError):
    """A call names a tool the registry does not hold."""


class ToolArgumentError(InvalidRequestError):
    """A call's arguments do not match the tool's schema; nothing ran."""


@dataclass
class ToolContext:
    """Who a call runs for. Built by the kernel, never by the caller."""
    tenant: str
    pid: int = 0                    # 0: an HTTP client, not an agent process
    caps: tuple[str, ...] = ()
    services: dict = field(default_factory=dict)     # kernel services a built-in may use


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict                          # JSON schema of the arguments
    func: Callable[..., Any] | None = None    # None: the call is routed elsewhere (MCP)
    needs_approval: bool = False
    timeout: float | None = None              # seconds; None: the pool's default
    max_concurrency: int | None = None        # calls at once; None: no limit of its own
    source: str = "code"                      # builtin | code | module | mcp
    takes_ctx: bool = False
    model: type[pydantic.BaseModel] | None = None

    @property
    def function_name(self) -> str:
        """The name shown to a model in function calling, where dots are not allowed."""
        return self.name.replace(".", "_")

    def spec(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters,
                "needs_approval": self.needs_approval, "source": self.source}

    def validate(self, args) -> dict:
        """The arguments after validation (types coerced as pydantic does in lax mode), or
        ToolArgumentError naming every field that is wrong."""
        if not isinstance(args, dict):
            raise ToolArgumentError(f"{self.name}: arguments must be an object, got {type(args).__name__}")
        if self.model is None:
            return _check_schema(self.name, self.parameters, args)
        try:
            return dict(self.model.model_validate(args))
        except pydantic.ValidationError as e:
            raise ToolArgumentError(f"{self.name}: invalid arguments: {_explain(e)}") from None


def _explain(e: pydantic.ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        msg = "unexpected argument" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _check_schema(name: str, schema: dict, args: dict) -> dict:
    """A tool known only by its JSON schema (an MCP tool) is validated with jsonschema."""
    import jsonschema
    try:
        jsonschema.validate(args, schema or {"type": "object"})
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "arguments"
        raise ToolArgumentError(f"{name}: invalid arguments: {where}: {e.message}") from None
    except jsonschema.SchemaError as e:
        raise ToolError(f"{name}: the tool's own schema is invalid: {e.message}") from None
    return args


def _docstring(func) -> tuple[str, dict[str, str]]:
    """The description (the docstring up to an Args: section) and per-parameter text from
    a Google-style Args: section."""
    doc = inspect.getdoc(func) or ""
    head, _, rest = doc.partition("\nArgs:")
    params: dict[str, str] = {}
    current = None
    for line in rest.splitlines():
        m = re.match(r"\s+(\w+)\s*(\([^)]*\))?:\s*(.*)", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= 4):
            current = m.group(1)
            params[current] = m.group(3).strip()
        elif current and line.strip():
            params[current] += " " + line.strip()
        elif not line.strip() and params:
            current = None
    return " ".join(head.split()), params


def from_function(func: Callable, *, name: str | None = None, description: str | None = None,
                  needs_approval: bool = False, timeout: float | None = None,
                  max_concurrency: int | None = None, source: str = "code") -> Tool:
    """A Tool whose schema is the function's signature: every parameter must be annotated;
    one without a default is required."""
    if not callable(func):
        raise InvalidRequestError(f"tool: expected a function, got {type(func).__name__}")
    name = name or func.__name__
    _check_name(name)
    sig = inspect.signature(func)
    hints = get_type_hints(func)
    summary, param_docs = _docstring(func)
    fields: dict[str, Any] = {}
    takes_ctx = False
    for i, (pname, p) in enumerate(sig.parameters.items()):
        if i == 0 and pname == "ctx":
            takes_ctx = True
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise InvalidRequestError(f"tool {name}: *args/**kwargs cannot be described by a schema")
        if pname not in hints:
            raise InvalidRequestError(f"tool {name}: parameter {pname!r} needs a type annotation")
        default = ... if p.default is p.empty else p.default
        fields[pname] = (hints[pname], pydantic.Field(default, description=param_docs.get(pname)))
    model = pydantic.create_model(f"{name.replace('.', '_')}_args",
                                  __config__=pydantic.ConfigDict(extra="forbid"), **fields)
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return Tool(name=name, description=description or summary or name, parameters=schema, func=func,
                needs_approval=needs_approval, timeout=timeout, max_concurrency=max_concurrency,
                source=source, takes_ctx=takes_ctx, model=model)


def _check_name(name) -> None:
    if not isinstance(name, str) or len(name) > MAX_NAME or not TOOL_NAME.fullmatch(name):
        raise InvalidRequestError(f"tool name: {name!r} must be dot-separated identifiers "
                                  f"(letters, digits, _ and -), at most {MAX_NAME} characters")


class ToolRegistry:
    """Every tool there is, by name. Thread-safe: MCP tools come and go while calls run."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._lock = threading.Lock()

    def add(self, tool: Tool, *, replace: bool = False) -> Tool:
        _check_name(tool.name)
        with self._lock:
            clash = [t.name for t in self._tools.values()
                     if t.name != tool.name and t.function_name == tool.function_name]
            if clash:
                raise InvalidRequestError(f"tool name: {tool.name!r} and {clash[0]!r} look the same to a model "
                                          f"({tool.function_name!r})")
            if tool.name in self._tools and not replace:
                raise InvalidRequestError(f"tool name: {tool.name!r} is already registered")
            self._tools[tool.name] = tool
        return tool

    def register(self, func: Callable, **kw) -> Tool:
        return self.add(from_function(func, **kw))

    def remove(self, name: str) -> None:
        with self._lock:
            self._tools.pop(name, None)

    def get(self, name) -> Tool:
        with self._lock:
            tool = self._tools.get(name) if isinstance(name, str) else None
            if tool is None:
                # A model names a tool by its function name (no dots); accept that too.
                tool = next((t for t in self._tools.values() if t.function_name == name), None)
        if tool is None:
            raise NoSuchTool(f"name: no tool named {name!r}")
        return tool

    def list(self) -> list[Tool]:
        with self._lock:
            return sorted(self._tools.values(), key=lambda t: t.name)

    def load_module(self, spec: str) -> list[str]:
        """Import a module (a dotted name, or a path to a .py file) so that its `@llmos.tool`
        functions register; returns the names it added."""
        if not isinstance(spec, str) or not spec:
            raise InvalidRequestError(f"tools.modules: entries must be module names or .py paths, got {spec!r}")
        try:
            if spec.endswith(".py"):
                path = Path(spec)
                mod_spec = importlib.util.spec_from_file_location(f"llmos_tools_{path.stem}", path)
                if mod_spec is None or not path.is_file():
                    raise FileNotFoundError(spec)
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[mod_spec.name] = module
                mod_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(spec)
        except Exception as e:
            raise InvalidRequestError(f"tools.modules: cannot import {spec!r}: {type(e).__name__}: {e}") from None
        added = [t for t in DEFAULT.list() if t.func is not None and t.func.__module__ == module.__name__]
        for t in added:
            if self is not DEFAULT:
                self.add(t, replace=True)
        return [t.name for t in added]

    def absorb(self, other: ToolRegistry) -> None:
        for t in other.list():
            self.add(t, replace=True)


DEFAULT = ToolRegistry()
"""Where `@llmos.tool` puts the tools a program defines; a kernel starts with a copy."""


def tool(func: Callable | None = None, *, name: str | None = None, description: str | None = None,
         needs_approval: bool = False, timeout: float | None = None, max_concurrency: int | None = None):
    """Register a function as a tool: `@llmos.tool` or `@llmos.tool(needs_approval=True)`."""
    def wrap(f: Callable) -> Callable:
        DEFAULT.add(from_function(f, name=name, description=description, needs_approval=needs_approval,
                                  timeout=timeout, max_concurrency=max_concurrency), replace=True)
        return f
    return wrap(func) if func is not None else wrap
