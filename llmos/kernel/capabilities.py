"""Capabilities: what a process may do, as a set of strings the kernel checks on every
system call. A process holds only what it was granted at spawn, and a child is granted at
most what its parent holds, so authority can only narrow down the process tree.

    llm                      every llm call: chat, generate, embed
    msg                      every msg call, to any process, on any topic
    msg:send:<name-glob>     send to processes whose name matches
    msg:topic:<topic-glob>   publish, subscribe and unsubscribe on matching topics
    proc:spawn               start child processes
    fs:read:<path-glob>      read, list and stat matching paths
    fs:write:<path-glob>     write, append and delete matching paths (not read them)
    tool:<name-glob>         call matching tools (and see them in tool.list)
    mem                      the process's own semantic long-term memory
    mem:shared               the tenant-wide shared memory as well (recall sees it, remember
                             and forget with shared=true reach it)
    kv:<key-glob>            read and write matching keys of the tenant's key-value store
    net                      the host's network (a jailed agent has none without it: its
                             only way out is the syscall gate); never granted unless asked for

Globs are fnmatch patterns (`*`, `?`, `[...]`), case-sensitive. A path is one string, so
`*` and `?` match `/` too: `fs:read:data/*` reaches data/x.txt and data/sub/y.txt (but not
data itself, datax or other/). Path globs are relative to the tenant's storage root and
normalised as storage normalises paths ("./data//*" is "data/*"; "/etc/*" and "../*" are
refused), so a capability and the path it is checked against are written the same way.

A call is checked by naming the concrete capability it needs (`required_for`), e.g.
fs.write of "out/x.txt" needs "fs:write:out/x.txt", and asking the process's set whether
one of its capabilities matches it (`Capabilities.allows`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from llmos.errors import InvalidRequestError, LLMOSError
from llmos.kernel.storage import TenantStorage

# Family -> whether it takes a glob. A family without one is the whole capability.
_FAMILIES = {"llm": False, "msg": False, "proc:spawn": False, "mem:shared": False, "mem": False, "net": False,
             "msg:send": True, "msg:topic": True, "fs:read": True, "fs:write": True, "tool": True, "kv": True}
_PATH_FAMILIES = ("fs:read", "fs:write")
_MSG_FAMILIES = ("msg:send", "msg:topic")
_WILDCARDS = "*?["
_MAX_GLOB = 1024

# Every capability there is: the set that covers all others, for a process a user starts
# directly rather than one spawned by another process.
ALL = ("llm", "msg", "proc:spawn", "fs:read:*", "fs:write:*", "tool:*", "mem", "mem:shared", "kv:*")
# What a user may grant a process it starts: ALL and the network, which is only ever given
# by name, so an agent started with every capability still has no network.
GRANTABLE = (*ALL, "net")


class PermissionDenied(LLMOSError):
    """A system call the calling process holds no capability for."""

    def __init__(self, call: str, pid: int, capability: str) -> None:
        super().__init__(f"{call} denied: process {pid} lacks capability {capability}")
        self.call = call
        self.pid = pid
        self.capability = capability


def _parse_one(cap) -> tuple[str, str | None]:
    """(family, glob or None) of one granted capability, or InvalidRequestError naming it."""
    if not isinstance(cap, str) or not cap:
        raise InvalidRequestError(f"capabilities: each must be a non-empty string, got {cap!r}")
    for family, takes_glob in _FAMILIES.items():
        if cap == family:
            if takes_glob:
                raise InvalidRequestError(f"capabilities: {cap!r} needs a glob, e.g. {cap}:*")
            return family, None
        if takes_glob and cap.startswith(family + ":"):
            glob = cap[len(family) + 1:]
            if family in _PATH_FAMILIES:
                try:
                    glob = TenantStorage.normalize(glob)
                except InvalidRequestError as e:
                    raise InvalidRequestError(f"capabilities: {cap!r}: {e}") from None
            if not glob:
                raise InvalidRequestError(f"capabilities: {cap!r} needs a glob after '{family}:'")
            if len(glob) > _MAX_GLOB:
                raise InvalidRequestError(f"capabilities: {cap[:80]!r}...: the glob is longer than {_MAX_GLOB} "
                                          f"characters")
            return family, glob
    raise InvalidRequestError(f"capabilities: unknown capability {cap!r}; known families: "
                              f"{', '.join(_FAMILIES)}")


def parse(caps) -> tuple[str, ...]:
    """Validate a list of capability strings; returns them canonical (path globs
    normalised) and without duplicates, in order."""
    if not isinstance(caps, (list, tuple)):
        raise InvalidRequestError(f"capabilities: must be a list of strings, got {type(caps).__name__}")
    out: dict[str, None] = {}
    for cap in caps:
        family, glob = _parse_one(cap)
        out[family if glob is None else f"{family}:{glob}"] = None
    return tuple(out)


def glob_covers(wide: str, narrow: str) -> bool:
    """Whether every string `narrow` matches is matched by `wide` as well. Deciding this for
    any two fnmatch patterns is hard, so this answers yes only when it is sure, and
    otherwise no (a parent may then have to grant a wider glob than strictly needed, but a
    child can never get more than its parent):
      - the two are equal;
      - `narrow` has no wildcards (it matches only itself) and `wide` matches it;
      - `wide` is a literal prefix followed by one `*` (`*` alone, "data/*", "worker-*")
        and the literal part of `narrow`, everything before its first wildcard, starts
        with that prefix: every match of `narrow` starts with its literal part, hence with
        the prefix, and `*` matches any rest."""
    if wide == narrow:
        return True
    if not any(c in narrow for c in _WILDCARDS):
        return fnmatchcase(narrow, wide)
    prefix = wide[:-1]
    if not wide.endswith("*") or any(c in prefix for c in _WILDCARDS):
        return False
    literal = narrow[:min((narrow.find(c) for c in _WILDCARDS if c in narrow))]
    return literal.startswith(prefix)


def _matches(glob: str, value: str) -> bool:
    return fnmatchcase(value, glob)


def _grants(have: tuple[str, str | None], want: tuple[str, str | None], match) -> bool:
    """Whether granted capability `have` reaches `want`, both as (family, glob or value);
    `match(glob, x)` compares the globs: a concrete value for `allows`, a child's glob for
    `missing`."""
    (family, glob), (wanted, arg) = have, want
    if family == "msg" and wanted in ("msg", "msg:recv", *_MSG_FAMILIES):
        return True
    if wanted == "msg:recv" and family in _MSG_FAMILIES:
        return True
    return family == wanted and (glob is None or match(glob, arg))


def _split_required(required: str) -> tuple[str, str | None] | None:
    """(family, value) of a concrete capability as `required_for` makes them, or None."""
    if required == "msg:recv" or _FAMILIES.get(required) is False:
        return required, None
    for family, takes_glob in _FAMILIES.items():
        if takes_glob and required.startswith(family + ":"):
            return family, required[len(family) + 1:]
    return None


@dataclass(frozen=True)
class Capabilities:
    """A process's capabilities: an immutable, validated set of capability strings, kept
    sorted so that equal sets compare and hash equal."""

    caps: tuple[str, ...]
    _parsed: tuple[tuple[str, str | None], ...] = field(init=False, repr=False, compare=False)

    def __init__(self, caps: list[str] | tuple[str, ...] = ()) -> None:
        caps = tuple(sorted(parse(caps)))
        object.__setattr__(self, "caps", caps)
        object.__setattr__(self, "_parsed", tuple(_parse_one(c) for c in caps))

    def __iter__(self):
        return iter(self.caps)

    def __len__(self) -> int:
        return len(self.caps)

    def allows(self, required: str) -> bool:
        """Whether one of these capabilities grants `required`, a concrete capability as
        `required_for` returns it ("llm", "msg:send:worker-3", "fs:read:data/a.txt")."""
        want = _split_required(required)
        return want is not None and any(_grants(cap, want, _matches) for cap in self._parsed)

    def check(self, pid: int, call: str, **args) -> None:
        """Raise PermissionDenied unless process `pid`, holding these capabilities, may
        make system call `call` with these arguments."""
        required = required_for(call, **args)
        if required is not None and not self.allows(required):
            raise PermissionDenied(call, pid, required)

    def missing(self, other: Capabilities) -> list[str]:
        """The capabilities of `other` (a child's) that none of these (its parent's) covers:
        `msg` covers itself and every msg:send and msg:topic capability; otherwise a
        capability covers one of its own family whose glob `glob_covers` its glob."""
        return [cap for cap, want in zip(other.caps, other._parsed)
                if not any(_grants(have, want, glob_covers) for have in self._parsed)]

    def covers(self, other: Capabilities) -> bool:
        """Whether `other` is a subset of these: what a child may be granted."""
        return not self.missing(other)


# The system call table: call -> (the capability family it needs, the argument that
# completes it, or None), or None for calls that need no capability. The proc calls that
# steer a process need none because the process table checks ownership instead: a process
# may steer only itself and its descendants.
_SYSCALLS: dict[str, tuple[str, str | None] | None] = {
    "llm.chat": ("llm", None), "llm.generate": ("llm", None), "llm.embed": ("llm", None),
    "msg.send": ("msg:send", "to"),
    "msg.recv": ("msg:recv", None), "msg.ack": ("msg:recv", None),
    "msg.publish": ("msg:topic", "topic"), "msg.subscribe": ("msg:topic", "topic"),
    "msg.unsubscribe": ("msg:topic", "topic"),
    "proc.spawn": ("proc:spawn", None),
    **dict.fromkeys(("proc.wait", "proc.kill", "proc.suspend", "proc.resume", "proc.renice", "proc.ps",
                     "proc.self", "proc.exit")),
    "fs.read": ("fs:read", "path"), "fs.list": ("fs:read", "path"), "fs.stat": ("fs:read", "path"),
    "fs.write": ("fs:write", "path"), "fs.append": ("fs:write", "path"), "fs.delete": ("fs:write", "path"),
    "tool.list": None, "tool.call": ("tool", "name"), "tool.await": None,
    "mem.remember": ("mem", None), "mem.recall": ("mem", None), "mem.forget": ("mem", None),
    "kv.get": ("kv", "key"), "kv.put": ("kv", "key"), "kv.delete": ("kv", "key"), "kv.list": ("kv", "prefix"),
    "conv.send": ("llm", None), "conv.get": ("llm", None),
}


def required_for(call: str, **args) -> str | None:
    """The concrete capability system call `call` needs with these arguments, or None if it
    needs none.

    - msg.recv and msg.ack need "msg:recv", which no one is granted by that name: any msg
      capability (msg, msg:send:*, msg:topic:*) grants it. A mailbox holds only what others
      were allowed to send it, so reading one's own takes no authority of its own, but a
      process granted no messaging at all has no business waiting on a mailbox.
    - fs paths are normalised first. fs.list of a directory d needs "fs:read:d/" (trailing
      slash): listing reveals the names inside d, so `fs:read:d/*` grants it, while
      `fs:read:d` (d itself) does not. Listing the tenant's root needs "fs:read:", which
      `fs:read:*` grants."""
    if call not in _SYSCALLS:
        raise InvalidRequestError(f"call: unknown system call {call!r}")
    if call.startswith("mem.") and args.get("shared"):
        return "mem:shared"
    need = _SYSCALLS[call]
    if need is None:
        return None
    family, arg = need
    if arg is None:
        return family
    value = args.get(arg)
    if call == "kv.list":
        return f"kv:{value or ''}*" if isinstance(value, str) or value is None else f"kv:{value!r}"
    if not isinstance(value, str) or (not value and family not in _PATH_FAMILIES):
        raise InvalidRequestError(f"{call}: '{arg}' must be a non-empty string, got {value!r}")
    if family in _PATH_FAMILIES:
        value = TenantStorage.normalize(value)
        if call == "fs.list" and value:
            value += "/"
    return f"{family}:{value}"
