"""Agents as processes: the parts of the kernel that run programs, assembled.

`AgentKernel` owns the durable process table and its supervisor, the message queues, the
tenant storage, the syscall journal, the audit log and intrusion detection, and the
handlers of every system call. What it needs of the LLM (run a request for a process,
suspend or cancel a process's requests) comes in as an `LLMService`, so the kernel never
imports the engine: an agent's LLM requests are ordinary kernel requests carrying its
tenant, priority and weight, and its pid so they can be found again.
"""

from __future__ import annotations

import base64
import os
import sys
import threading
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from llmos.errors import InvalidRequestError, LLMOSError
from llmos.kernel import jail
from llmos.kernel.audit import AuditLog
from llmos.kernel.capabilities import ALL, GRANTABLE, Capabilities, PermissionDenied, parse
from llmos.kernel.intrusion import IntrusionDetector
from llmos.kernel.ipc import MessageQueue
from llmos.kernel.journal import Journal
from llmos.kernel.kvstore import KeyValueStore
from llmos.kernel.memory import SHARED, own_scope, visible_scopes
from llmos.kernel.process import LimitExceeded, Limits, NoSuchProcess, Process, ProcessState, ProcessTable
from llmos.kernel.storage import TenantStorage
from llmos.kernel.supervisor import Supervisor
from llmos.kernel.syscall import SyscallTable
from llmos.tools import loop
from llmos.tools.library import FunctionLibrary
from llmos.tools.registry import ToolContext
from llmos.validate import integer as _int, number

MAX_BLOCK = 20.0     # seconds one blocking call may wait; the SDK calls again for longer waits


class LLMService(Protocol):
    def generate(self, proc: Process, prompt: str | list[dict], sampling: dict, *, tools: list[dict] | None = None,
                 tool_choice=None) -> dict:
        """{"text", "finish_reason", "prompt_tokens", "output_tokens", "tool_call": {"name", "arguments"} | None};
        with `tools` (OpenAI function definitions) the output may be one call to one of them."""

    def embed(self, texts: list[str]) -> list[list[float]]: ...

    def cancel(self, pid: int) -> None: ...

    def suspend(self, pid: int) -> None: ...

    def resume(self, pid: int) -> None: ...

    def renice(self, pid: int, priority: int, weight: float) -> None: ...


# What a confined agent starts with: the llmos package and the site-packages bound in, the
# working directory first on sys.path (as `python -m` puts it), then the launcher.
_BOOT = ("import os, site, sys; sys.path[:0] = [os.getcwd(), %r]; site.addsitedir(%r); "
         "from llmos.agent.run import main; sys.exit(main(sys.argv[1:]))") % (jail.LIB, jail.SITE)


class HostProgramNotAllowed(LLMOSError):
    """A tenant key asked to run something outside its tenant's storage: a host path, a
    module:function or a working directory of its own choosing."""


class AgentKernel:
    """`confinement` is an AgentSettings-like object (confinement, uid_base, uid_count,
    scratch_mb, max_pids, open_files); None runs agents unconfined, as `confinement = "none"`."""

    def __init__(self, home: Path, url: str, llm: LLMService, *, socket: Path | None = None, kill_grace: float = 5.0,
                 visibility_timeout: float = 30.0, dead_letter_ttl: float = 3600.0,
                 denial_threshold: int = 20, max_restarts: int = 5,
                 restart_backoff: tuple[float, float] = (0.1, 5.0), library: FunctionLibrary | None = None,
                 memory=None, conversations=None, hidden_paths: list[str] = (), confinement=None) -> None:
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)       # the kernel's: its databases, every tenant's files, the gate's socket
        self.home = home
        self.socket = None if socket is None else str(socket)
        self.confinement = confinement if confinement is not None and confinement.confinement != "none" else None
        self.llm = llm
        self.library = library
        self.memory = memory                 # a SemanticMemory, or None: mem.* calls then fail clearly
        self.conversations = conversations
        self.hidden_paths = list(hidden_paths)   # what the python tool must not see
        self.kv = KeyValueStore(home / "kv.db")
        self.table = ProcessTable(home / "processes.db")
        self.ipc = MessageQueue(home / "messages.db", visibility_timeout=visibility_timeout,
                                dead_letter_ttl=dead_letter_ttl)
        self.storage = TenantStorage(home / "files")
        self.journal = Journal(home / "journal.db")
        self.audit = AuditLog(home / "audit.db", home / "audit.key")
        self.intrusion = IntrusionDetector(denial_threshold=denial_threshold)
        self.url = url
        self.supervisor = Supervisor(self.table, home, launcher=self._command,
                                     env={"LLMOS_URL": url, **({"LLMOS_SOCKET": str(socket)} if socket else {})},
                                     on_exit=self._on_exit, on_suspend=llm.suspend, on_resume=llm.resume,
                                     on_violation=self._violation,
                                     kill_grace=kill_grace, max_restarts=max_restarts,
                                     restart_backoff=restart_backoff)
        self.syscalls = SyscallTable(self._handlers(), self.audit, self.journal, self.intrusion,
                                     on_intrusion=self._intrusion, on_call=self._count_call,
                                     checked_args=self._checked_args)
        self._stop = threading.Event()
        # Per-call counters (syscalls, messages) add up here and reach the process table once a
        # second and when a run ends: a table write per call would cost more than the call.
        self._usage: dict[int, Counter] = defaultdict(Counter)
        self._usage_lock = threading.Lock()
        self._known_names: set[tuple[str, str]] = set()   # names that exist (they never go away)
        self.restarted = self.recover()
        self._sweeper = threading.Thread(target=self._sweep, name="llmos-ipc-sweep", daemon=True)
        self._sweeper.start()

    # -- life cycle -------------------------------------------------------------------------
    def recover(self) -> list[int]:
        """After a kernel restart: orphans of the old kernel are killed, lost processes
        restarted as their policy says; mailboxes of processes that are gone are closed so
        their messages dead-letter after the TTL unless a process of that name returns."""
        restarted = self.supervisor.recover()
        live = {(p.tenant, p.name) for p in self.table.list() if p.state.live}
        for p in self.table.list(include_exited=True):
            if (p.tenant, p.name) in live:
                self.ipc.open(p.tenant, p.name)
            else:
                self.ipc.close(p.tenant, p.name)
        self.journal.prune_exited(p.pid for p in self.table.list(include_exited=True) if not p.state.live)
        return restarted

    def shutdown(self) -> None:
        self._stop.set()
        self.supervisor.shutdown()
        self.flush_usage()
        self.ipc.shutdown()
        self.audit.close()

    def _sweep(self) -> None:
        ticks = 0
        while not self._stop.wait(1.0):
            self.flush_usage()
            ticks += 1
            if ticks % 5 == 0:
                self.ipc.sweep()

    def flush_usage(self, pid: int | None = None) -> None:
        with self._usage_lock:
            pids = list(self._usage) if pid is None else [pid]
            pending = {p: self._usage.pop(p) for p in pids if p in self._usage}
        for p, counts in pending.items():
            self.table.add_usage(p, **counts)

    def _charge(self, proc: Process, **counts: int) -> None:
        with self._usage_lock:
            self._usage[proc.pid].update(counts)

    def _on_exit(self, proc: Process) -> None:
        self.flush_usage(proc.pid)
        self.llm.cancel(proc.pid)
        if proc.state.live:           # a restart follows: what it held unacked comes back
            self.ipc.release(proc.tenant, proc.name)
            return
        self.ipc.close(proc.tenant, proc.name)
        self.journal.prune(proc.pid)

    def _intrusion(self, proc: Process) -> None:
        """Too many denied calls in the window: suspend the process and flag it."""
        self.supervisor.suspend(proc.pid)

    def _checked_args(self, proc: Process, call: str, args: dict) -> dict:
        """A send addressed by pid is checked against msg:send:<that process's name>."""
        to = args.get("to")
        if call == "msg.send" and isinstance(to, int) and not isinstance(to, bool):
            return {**args, "to": self.resolve(proc.tenant, to)}
        return args

    def _count_call(self, proc: Process) -> None:
        self._charge(proc, syscalls=1)

    # -- confinement ------------------------------------------------------------------------
    def _command(self, proc: Process) -> list[str] | jail.Plan:
        """What the supervisor runs for `proc`: the launcher in a jail (see jail.py), or,
        with confinement off, the launcher itself."""
        if self.confinement is None:
            return [sys.executable, "-m", "llmos.agent.run", *proc.argv]
        c = self.confinement
        program, args = proc.argv[0], proc.argv[1:]
        binds = jail.runtime_binds(with_llmos=True)
        target, cwd = program, f"{jail.RUN_DIR}/cwd"
        if not _is_entry_point(program):
            binds.append((os.path.dirname(program), jail.PROGRAM))
            target = f"{jail.PROGRAM}/{os.path.basename(program)}"
            if proc.cwd == os.path.dirname(program):
                cwd = jail.PROGRAM
        if cwd != jail.PROGRAM:
            binds.append((proc.cwd, cwd))
        env = {**jail.runtime_env(), "LLMOS_URL": self.url}
        if self.socket is not None:
            binds.append((self.socket, jail.SOCKET))
            env["LLMOS_SOCKET"] = jail.SOCKET
        rlimits = {"CORE": 0, "NOFILE": c.open_files, "FSIZE": c.scratch_mb << 20}
        if proc.limits.max_memory is not None:
            rlimits["AS"] = proc.limits.max_memory
        if proc.limits.max_cpu is not None:
            rlimits["CPU"] = proc.limits.max_cpu
        uid = gid = None
        if os.geteuid() == 0:
            uid = gid = c.uid_base + (self.table.tenant_number(proc.tenant) - 1) % c.uid_count
            rlimits["NPROC"] = proc.limits.max_pids or c.max_pids      # counts the tenant's uid
        hidden = sorted({*self.hidden_paths, str(self.home)})
        return jail.Plan(argv=[jail.python_in_jail(), "-I", "-S", "-c", _BOOT, target, *args], cwd=cwd, env=env,
                         binds=binds, hidden=hidden, network="net" in proc.caps, uid=uid, gid=gid, rlimits=rlimits,
                         scratch_bytes=c.scratch_mb << 20)

    def confinement_summary(self) -> dict:
        """How agents are confined, for the kernel's stats: {"confinement": "jail" | "none",
        "limits": "rlimits" | None}; cgroup limits are not built yet."""
        if self.confinement is None:
            return {"confinement": "none", "limits": None}
        return {"confinement": "jail", "limits": "rlimits"}

    def _violation(self, pid: int, syscall: str) -> None:
        """A call the jail's filter refused: audited as a denied system call, and counted by
        intrusion detection like any other denial."""
        proc = self.table.get(pid)
        if proc is None:
            return
        rid = self.audit.begin(pid, proc.tenant, f"os.{syscall}", {}, False, "refused by the jail (seccomp)")
        self.audit.finish(rid, "EPERM", 0.0)
        self.syscalls._count(f"os.{syscall}", "denied")
        if self.intrusion.denied(pid):
            self._intrusion(proc)

    def spawn(self, *, tenant: str, path: str, args=(), cwd: str | None = None, name: str | None = None,
              caps=None, limits: dict | None = None, priority: int = 0, weight: float = 1.0,
              restart: str = "never", durable: bool = False, key_id: str | None = None,
              parent: Process | None = None, admin: bool = False) -> Process:
        """Start an agent. A child's capabilities and limits must be a subset of its parent's;
        None means the parent's (all, for a process a user starts). A relative `path` names
        a program in the tenant's storage (for a child: beside its parent's program); a host
        path, a module:function or a `cwd` need `admin` (an admin key, or a parent an admin
        started from the host)."""
        program, cwd = self._program(tenant, path, cwd, parent, admin)
        if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
            raise InvalidRequestError(f"args: must be a list of strings, got {args!r}")
        have = Capabilities(parent.caps if parent else GRANTABLE)
        want = Capabilities((parent.caps if parent else ALL) if caps is None else parse(caps))
        missing = have.missing(want)
        if missing:
            raise PermissionDenied("proc.spawn", parent.pid if parent else 0, missing[0])
        base = parent.limits if parent else Limits()
        lim = Limits.from_dict(limits or {}, base=base) if limits or parent else None
        if parent is not None and priority < parent.priority:
            raise LimitExceeded("priority", f"a child may not run at priority {priority}, more urgent "
                                            f"than its parent's {parent.priority}")
        proc = self.supervisor.spawn(tenant=tenant, argv=[program, *args], cwd=cwd, name=name,
                                     ppid=parent.pid if parent else None, key_id=key_id, caps=list(want.caps),
                                     limits=lim, priority=priority, weight=weight, restart=restart, durable=durable)
        self.ipc.open(tenant, proc.name)
        return proc

    def _from_storage(self, tenant: str, program: str) -> bool:
        return not _is_entry_point(program) and self.storage.holds(tenant, program)

    def _program(self, tenant: str, path, cwd, parent: Process | None, admin: bool) -> tuple[str, str]:
        """The program to run (a host file path, or module:function) and its directory,
        from what the caller may name."""
        if not isinstance(path, str) or not path:
            raise InvalidRequestError(f"path: must be a file path or module:function, got {path!r}")
        host = admin or (parent is not None and not self._from_storage(tenant, parent.argv[0]))
        if parent is not None and not os.path.isabs(path) and not _looks_like_entry_point(path):
            if host:
                here = parent.cwd if _is_entry_point(parent.argv[0]) else os.path.dirname(parent.argv[0])
                path = os.path.join(here, path)
            elif not host:
                here = os.path.relpath(os.path.dirname(parent.argv[0]), self.storage.base(tenant))
                path = os.path.normpath(os.path.join(here, path))
        if not os.path.isabs(path) and not _looks_like_entry_point(path):
            if cwd is not None and not host:
                raise HostProgramNotAllowed("cwd: only an admin key may choose an agent's working directory; "
                                            "a tenant's agent runs in its program's directory")
            real = self.storage.resolve(tenant, path)
            return real, cwd or os.path.dirname(real)
        if not host:
            raise HostProgramNotAllowed(
                f"path: {path!r} is a host path or module:function, which only an admin key may run; a tenant "
                f"key runs programs from its own storage: store it with PUT /v1/fs/<file> (`llmos run ./file.py` "
                f"does that), then spawn it by its relative path")
        return _program(path, cwd)

    def process(self, pid: int, tenant: str | None = None) -> Process:
        proc = self.table.get(pid) if isinstance(pid, int) and not isinstance(pid, bool) else None
        if proc is None or (tenant is not None and proc.tenant != tenant):
            raise NoSuchProcess(f"pid: no process {pid!r}")
        return proc

    def renice(self, pid: int, priority: int, weight: float | None = None) -> bool:
        ok = self.supervisor.renice(pid, priority, weight)
        if ok:
            p = self.table.get(pid)
            self.llm.renice(pid, p.priority, p.weight)
        return ok

    def resolve(self, tenant: str, to) -> str:
        """The mailbox a send addresses: a pid or a name of one of the tenant's processes
        (live or not: messages to a name wait for a restarted process of that name)."""
        if isinstance(to, int) and not isinstance(to, bool):
            return self.process(to, tenant).name
        if isinstance(to, str) and to:
            if (tenant, to) not in self._known_names:
                if self.table.by_name(tenant, to) is None:
                    raise NoSuchProcess(f"to: no process named {to!r}")
                self._known_names.add((tenant, to))
            return to
        raise InvalidRequestError(f"to: must be a pid or a process name, got {to!r}")

    # -- system calls ---------------------------------------------------------------------
    def _handlers(self) -> dict:
        return {
            "llm.chat": self._llm_chat, "llm.generate": self._llm_generate, "llm.embed": self._llm_embed,
            "msg.send": self._msg_send, "msg.recv": self._msg_recv, "msg.ack": self._msg_ack,
            "msg.publish": self._msg_publish, "msg.subscribe": self._msg_subscribe,
            "msg.unsubscribe": self._msg_unsubscribe,
            "proc.spawn": self._proc_spawn, "proc.wait": self._proc_wait, "proc.kill": self._proc_kill,
            "proc.suspend": self._proc_suspend, "proc.resume": self._proc_resume, "proc.renice": self._proc_renice,
            "proc.ps": self._proc_ps, "proc.self": self._proc_self, "proc.exit": self._proc_exit,
            "fs.read": self._fs_read, "fs.write": self._fs_write, "fs.append": self._fs_append,
            "fs.list": self._fs_list, "fs.delete": self._fs_delete, "fs.stat": self._fs_stat,
            "tool.list": self._tool_list, "tool.call": self._tool_call, "tool.await": self._tool_await,
            "mem.remember": self._mem_remember, "mem.recall": self._mem_recall, "mem.forget": self._mem_forget,
            "kv.get": self._kv_get, "kv.put": self._kv_put, "kv.delete": self._kv_delete, "kv.list": self._kv_list,
            "conv.send": self._conv_send, "conv.get": self._conv_get,
        }

    def _blocked(self, proc: Process):
        return _Blocked(self.supervisor, proc.pid)

    def _llm(self, proc: Process, prompt, sampling, **tools) -> dict:
        if not isinstance(sampling, dict):
            raise InvalidRequestError(f"sampling: must be an object, got {sampling!r}")
        cap = proc.limits.max_tokens
        if cap is not None:
            fresh = self.table.get(proc.pid)
            left = cap - fresh.prompt_tokens - fresh.output_tokens
            if left <= 0:
                raise LimitExceeded("max_tokens", f"process {proc.pid} has used its {cap} LLM tokens")
            sampling = {**sampling, "max_tokens": min(sampling.get("max_tokens", 256), left)}
        with self._blocked(proc):
            out = self.llm.generate(proc, prompt, sampling, **tools)
        self.table.add_usage(proc.pid, prompt_tokens=out["prompt_tokens"], output_tokens=out["output_tokens"])
        return out

    def _llm_chat(self, proc, a):
        messages = a.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise InvalidRequestError("messages: must be a non-empty list of {'role': str, 'content': str}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if a.get("tools") is None:
            return self._llm(proc, messages, a.get("sampling", {}))
        return self._chat_with_tools(proc, messages, a)

    def _llm_generate(self, proc, a):
        prompt = a.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError(f"prompt: must be a non-empty string, got {prompt!r}")
        return self._llm(proc, prompt, a.get("sampling", {}))

    def _llm_embed(self, proc, a):
        texts = a.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidRequestError("input: must be a string or a non-empty list of strings")
        return {"embeddings": self.llm.embed(texts)}

    def _msg_send(self, proc, a):
        mailbox = self.resolve(proc.tenant, a.get("to"))
        block = a.get("block")
        if block is not None:
            block = min(float(_nonneg("block", block)), MAX_BLOCK)
        mid = self.ipc.send(proc.tenant, mailbox, a.get("body"), sender=proc.pid, sender_name=proc.name, block=block)
        self._charge(proc, messages=1)
        return {"id": mid}

    def _msg_recv(self, proc, a):
        timeout = a.get("timeout")
        timeout = MAX_BLOCK if timeout is None else min(float(_nonneg("timeout", timeout)), MAX_BLOCK)
        m = self.ipc.recv(proc.tenant, proc.name, 0)
        if m is None and timeout > 0:
            with self._blocked(proc):      # only a call that waits shows the process blocked
                m = self.ipc.recv(proc.tenant, proc.name, timeout)
        return {"message": None if m is None else asdict(m)}

    def _msg_ack(self, proc, a):
        self.ipc.ack(proc.tenant, proc.name, _int("id", a.get("id"), 0, 2**63 - 1))
        return {}

    def _msg_publish(self, proc, a):
        n = self.ipc.publish(proc.tenant, a["topic"], a.get("body"), sender=proc.pid, sender_name=proc.name)
        self._charge(proc, messages=1)
        return {"delivered": n}

    def _msg_subscribe(self, proc, a):
        self.ipc.subscribe(proc.tenant, a["topic"], proc.name)
        return {}

    def _msg_unsubscribe(self, proc, a):
        self.ipc.unsubscribe(proc.tenant, a["topic"], proc.name)
        return {}

    def _steerable(self, proc: Process, pid) -> Process:
        """A process may steer only itself and its descendants."""
        target = self.process(_int("pid", pid), proc.tenant)
        if target.pid != proc.pid and target.pid not in {d.pid for d in self.table.descendants(proc.pid)}:
            raise PermissionDenied("proc", proc.pid, f"proc:steer:{target.pid}")
        return target

    def _proc_spawn(self, proc, a):
        child = self.spawn(tenant=proc.tenant, path=a.get("path"), args=a.get("args") or [], name=a.get("name"),
                           caps=a.get("caps"), limits=a.get("limits"), priority=a.get("priority", proc.priority),
                           weight=a.get("weight", 1.0), restart=a.get("restart", "never"),
                           durable=bool(a.get("durable", False)), key_id=proc.key_id, parent=proc)
        return {"pid": child.pid}

    def _proc_wait(self, proc, a):
        target = self._steerable(proc, a.get("pid"))
        timeout = a.get("timeout")
        timeout = MAX_BLOCK if timeout is None else min(float(_nonneg("timeout", timeout)), MAX_BLOCK)
        with self._blocked(proc):
            code = self.supervisor.wait(target.pid, timeout=timeout, waiter=proc.pid)
        done = not self.table.get(target.pid).state.live
        return {"exit_code": code if done else None, "done": done}

    def _proc_kill(self, proc, a):
        return {"ok": self.supervisor.kill(self._steerable(proc, a.get("pid")).pid)}

    def _proc_suspend(self, proc, a):
        return {"ok": self.supervisor.suspend(self._steerable(proc, a.get("pid")).pid)}

    def _proc_resume(self, proc, a):
        return {"ok": self.supervisor.resume(self._steerable(proc, a.get("pid")).pid)}

    def _proc_renice(self, proc, a):
        target = self._steerable(proc, a.get("pid"))
        priority = _int("priority", a.get("priority"))
        if priority < proc.priority:
            raise LimitExceeded("priority", f"may not renice to {priority}, more urgent than its own {proc.priority}")
        weight = a.get("weight")
        return {"ok": self.renice(target.pid, priority, None if weight is None else float(_nonneg("weight", weight)))}

    def _proc_ps(self, proc, a):
        return {"processes": [p.to_dict() for p in self.table.list(proc.tenant, include_exited=bool(a.get("all")))]}

    def _proc_self(self, proc, a):
        return self.table.get(proc.pid).to_dict()

    def _proc_exit(self, proc, a):
        _int("code", a.get("code", 0))
        return {}

    def _fs_read(self, proc, a):
        return {"data": base64.b64encode(self.storage.read(proc.tenant, a["path"])).decode()}

    def _fs_write(self, proc, a):
        self.storage.write(proc.tenant, a["path"], _b64(a.get("data")))
        return {}

    def _fs_append(self, proc, a):
        self.storage.append(proc.tenant, a["path"], _b64(a.get("data")))
        return {}

    def _fs_list(self, proc, a):
        return {"entries": self.storage.list(proc.tenant, a.get("path", ""))}

    def _fs_delete(self, proc, a):
        self.storage.delete(proc.tenant, a["path"])
        return {}

    def _fs_stat(self, proc, a):
        return self.storage.stat(proc.tenant, a["path"])


    # -- the function library -------------------------------------------------------------
    def tool_context(self, tenant: str, pid: int, caps) -> ToolContext:
        """Who a tool call runs for, with the kernel services built-ins act through."""
        if self.library is None:
            raise InvalidRequestError("tool: this kernel has no function library")
        return ToolContext(tenant, pid, tuple(caps), {"storage": self.storage, "memory": self.memory, "kv": self.kv,
                                                      "hidden_paths": self.hidden_paths})

    def _tool_ctx(self, proc: Process) -> ToolContext:
        return self.tool_context(proc.tenant, proc.pid, proc.caps)

    def _tool_list(self, proc, a):
        self._tool_ctx(proc)
        return {"tools": [t.spec() for t in self.library.tools(tuple(proc.caps))]}

    def _tool_call(self, proc, a):
        ctx = self._tool_ctx(proc)
        tool = self.library.get(a.get("name"))
        state = ProcessState.WAITING_APPROVAL if tool.needs_approval else ProcessState.BLOCKED
        with _Blocked(self.supervisor, proc.pid, state):
            return self.library.call(ctx, tool.name, a.get("args"), wait=MAX_BLOCK)

    def _tool_await(self, proc, a):
        ctx = self._tool_ctx(proc)
        with _Blocked(self.supervisor, proc.pid, ProcessState.WAITING_APPROVAL):
            return self.library.await_approval(ctx, a.get("id"), wait=MAX_BLOCK)

    def _chat_with_tools(self, proc: Process, messages: list[dict], a: dict) -> dict:
        """llm.chat with tools: one generation that may call one (execute_tools false), or
        the whole model -> tool -> model loop run here (execute_tools true)."""
        names = a.get("tools")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InvalidRequestError(f"tools: must be a non-empty list of tool names, got {names!r}")
        self._tool_ctx(proc)                  # a kernel without a library says so here
        tools = [self.library.get(n) for n in names]
        for t in tools:
            Capabilities(proc.caps).check(proc.pid, "tool.call", name=t.name)
        sampling = a.get("sampling", {})

        def generate(msgs, specs, choice):
            out = self._llm(proc, msgs, sampling, tools=specs or None, tool_choice=choice)
            return loop.TurnOutput(out["text"], out.get("tool_call"), out["prompt_tokens"], out["output_tokens"],
                                   out["finish_reason"])

        if not a.get("execute_tools"):
            out = generate(messages, loop.function_specs(tools), _choice(a.get("tool_choice", "auto"), tools))
            call = out.call and {**out.call, "name": self.library.get(out.call["name"]).name}
            return {"text": out.text, "tool_call": call, "finish_reason": out.finish_reason,
                    "prompt_tokens": out.prompt_tokens, "output_tokens": out.output_tokens}

        def call_tool(name, args):
            return self.syscalls.call(proc, "tool.call", {"name": name, "args": args})["result"]

        result = loop.run(generate, call_tool, messages, tools, max_turns=a.get("max_turns", 4),
                          tool_choice=a.get("tool_choice", "auto"))
        return result.to_dict()

    # -- long-term memory and the key-value store --------------------------------------------
    def _memory(self):
        if self.memory is None:
            raise InvalidRequestError("mem: this kernel has no semantic memory")
        return self.memory

    def _mem_remember(self, proc, a):
        scope = SHARED if a.get("shared") else own_scope(proc.pid)
        return {"id": self._memory().remember(proc.tenant, scope, a.get("text"), a.get("metadata"))}

    def _mem_recall(self, proc, a):
        scopes = visible_scopes(proc.pid, Capabilities(proc.caps).allows("mem:shared"))
        items = self._memory().recall(proc.tenant, scopes, a.get("query"), a.get("k", 5), a.get("filter"))
        return {"items": [{"id": m.id, "text": m.text, "score": m.score, "metadata": m.metadata,
                           "created_at": m.created_at, "shared": m.scope == SHARED} for m in items]}

    def _mem_forget(self, proc, a):
        scopes = [SHARED if a.get("shared") else own_scope(proc.pid)]
        return {"ok": self._memory().forget(proc.tenant, scopes, a.get("id"))}

    def _kv_get(self, proc, a):
        return {"item": self.kv.get(proc.tenant, a.get("key"))}

    def _kv_put(self, proc, a):
        if_version = a.get("if_version")
        if if_version is not None:
            if_version = _int("if_version", if_version, 0)
        return {"version": self.kv.put(proc.tenant, a.get("key"), a.get("value"), if_version)}

    def _kv_delete(self, proc, a):
        return {"ok": self.kv.delete(proc.tenant, a.get("key"))}

    def _kv_list(self, proc, a):
        return {"keys": self.kv.list(proc.tenant, a.get("prefix") or "")}

    # -- conversations longer than the context window ------------------------------------------
    def _conversations(self):
        if self.conversations is None:
            raise InvalidRequestError("conv: this kernel has no conversation store")
        return self.conversations

    def _conv_send(self, proc, a):
        convs = self._conversations()
        with self._blocked(proc):
            return convs.send(proc.tenant, a.get("name"), a.get("content"),
                              generate=lambda msgs, sampling: self._llm(proc, msgs, sampling),
                              sampling=a.get("sampling", {}), budget=a.get("budget"))

    def _conv_get(self, proc, a):
        return self._conversations().get(proc.tenant, a.get("name")).to_dict()


class _Blocked:
    """The process shows as blocked (or waiting for approval) while it waits inside a
    system call."""

    def __init__(self, supervisor: Supervisor, pid: int, state: ProcessState = ProcessState.BLOCKED) -> None:
        self.supervisor, self.pid, self.state = supervisor, pid, state

    def __enter__(self):
        self.supervisor.set_state(self.pid, self.state)

    def __exit__(self, *exc):
        self.supervisor.set_state(self.pid, ProcessState.RUNNING)


def _program(path, cwd: str | None) -> tuple[str, str]:
    """The program to run (an absolute .py path, or module:function) and its directory."""
    if not isinstance(path, str) or not path:
        raise InvalidRequestError(f"path: must be a file path or module:function, got {path!r}")
    if ":" in path and not os.path.exists(path):
        module, _, func = path.partition(":")
        if not module or not func or not all(p.isidentifier() for p in module.split(".") + [func]):
            raise InvalidRequestError(f"path: {path!r} is neither a file nor module:function")
        return path, cwd or os.getcwd()
    if not os.path.isabs(path):
        raise InvalidRequestError(f"path: must be absolute (resolve it against the caller's directory), got {path!r}")
    if not os.path.isfile(path):
        raise InvalidRequestError(f"path: no such file {path!r}")
    return path, cwd or os.path.dirname(path)


def _is_entry_point(program: str) -> bool:
    """Whether the program as the table holds it is module:function (a file path is absolute)."""
    return not os.path.isabs(program)


def _looks_like_entry_point(path: str) -> bool:
    module, sep, func = path.partition(":")
    return bool(sep) and bool(func) and all(p.isidentifier() for p in module.split(".") + [func])


def _choice(choice, tools) -> object:
    """An agent's tool_choice ("auto", "required", or a tool's name) as the LLM layer takes it."""
    if choice in ("auto", "required", "none"):
        return choice
    for t in tools:
        if choice in (t.name, t.function_name):
            return {"type": "function", "function": {"name": t.function_name}}
    raise InvalidRequestError(f"tool_choice: must be auto, required, none or one of the tools given, got {choice!r}")


def _nonneg(name: str, v) -> float:
    return number(name, v, 0)


def _b64(data) -> bytes:
    if not isinstance(data, str):
        raise InvalidRequestError("data: must be base64 text")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise InvalidRequestError("data: not valid base64") from None

