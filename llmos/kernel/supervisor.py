"""The supervisor: runs each agent as its own OS process and watches it until it ends, the
way systemd watches a service.

Each process gets a clean environment, its own session and process group (so one signal
reaches everything it started), stdin from /dev/null, its output in a capped log, and the
rlimits its Limits ask for. One thread per run reaps it with wait4 (for the exit status and
the resource usage), writes the outcome to the process table and applies the restart
policy. A restart keeps the llmos pid and name, so mail and waits addressed to the agent
still reach it. After a kernel crash, `recover` finds the agents the dead kernel left
behind, kills them (no agent ever runs twice) and restarts those whose policy says so.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

from llmos.errors import InvalidRequestError, LLMOSError
from llmos.kernel import jail
from llmos.kernel.process import Limits, LimitExceeded, NoSuchProcess, Process, ProcessState, ProcessTable

log = logging.getLogger(__name__)

# All an agent inherits from the server's environment: nothing secret, nothing of the server's.
_INHERITED_ENV = ("PATH", "HOME", "LANG", "TMPDIR")


# The last line of a jailed run's log that shows which of its rlimits it hit.
_LIMIT_MARKERS = (("MemoryError", "max_memory"), ("[Errno 11] Resource temporarily unavailable", "max_pids"),
                  ("can't start new thread", "max_pids"), ("[Errno 28]", "max_scratch"), ("[Errno 27]", "max_scratch"))
_LIMIT_REASONS = {"max_memory", "max_pids", "max_scratch"}
JAIL_START_TIMEOUT = 30.0

# States of a process that runs or waits inside a system call (not suspended, not ended).
_ACTIVE = (ProcessState.RUNNING, ProcessState.BLOCKED, ProcessState.WAITING_APPROVAL)

class DeadlockError(LLMOSError):
    """A wait that could never return: the target (transitively) waits on the waiter."""


def _proc_stat(os_pid: int) -> tuple[str, int] | None:
    """(state letter, start time) from /proc/<pid>/stat, or None if there is no such process.
    The start time (field 22, clock ticks since boot) together with the pid names one OS
    process for as long as the machine is up, even after the pid number is reused."""
    try:
        with open(f"/proc/{os_pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data.rsplit(b")", 1)[1].split()     # the command name before ')' may hold spaces
    return rest[0].decode(), int(rest[19])


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _timer(delay: float, fn: Callable, *args) -> threading.Timer:
    t = threading.Timer(delay, fn, args)
    t.daemon = True
    t.start()
    return t


class LogFile:
    """An agent's stdout and stderr, capped: when the current file reaches half the cap it
    becomes <pid>.log.1, replacing the older half, so at most `cap` bytes are kept and the
    newest output always survives."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.old = path.with_name(path.name + ".1")
        self.half = max(1, cap // 2)
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            while data:
                with open(self.path, "ab") as f:
                    room = max(0, self.half - f.tell())
                    f.write(data[:room])
                    data = data[room:]
                    full = f.tell() >= self.half
                if full:
                    os.replace(self.path, self.old)

    def read(self, tail_bytes: int | None = None) -> bytes:
        with self._lock:
            data = b"".join(p.read_bytes() for p in (self.old, self.path) if p.exists())
        return data if tail_bytes is None else data[max(0, len(data) - tail_bytes):]


@dataclass
class _Run:
    """One OS process of a table row; a row has at most one at a time, a new one per restart."""

    popen: subprocess.Popen
    limits: Limits
    kill_reason: str | None = None       # set when llmos ends it: "killed", "shutdown", "max_wall"
    reaped: bool = False                 # once true its pid (and group id) may belong to a stranger
    resume_state: ProcessState = ProcessState.RUNNING    # what resume() restores
    timers: list[threading.Timer] = field(default_factory=list)
    reader: threading.Thread | None = None
    jailed: bool = False
    features: dict | None = None         # what the jail applied, once it says so
    ready: threading.Event = field(default_factory=threading.Event)
    exit_code: int | None = None         # the program's own status, as the jail's init saw it
    listener: threading.Thread | None = None

    @property
    def os_pid(self) -> int:
        return self.popen.pid


class Supervisor:
    """Starts, watches, signals and restarts agent processes; the process table is its
    memory. Every method may be called from any thread.

    `launcher(proc)` says what to run: a command line (run unconfined, with the rlimits
    set from outside) or a jail.Plan (confined; the plan carries its limits). Callbacks,
    each called outside the supervisor's lock: `on_exit(proc)` after a run of this kernel
    ends (with the row as written: state starting if a restart will follow) and when a row
    becomes final without a run (a pending restart killed, a lost agent not restarted);
    `on_suspend(pid)` and `on_resume(pid)` after the signal is sent; `on_violation(pid,
    syscall)` when the jail's filter refused a call of the process.
    """

    def __init__(self, table: ProcessTable, home: Path, *, launcher: Callable[[Process], list[str] | jail.Plan],
                 env: dict[str, str], on_exit: Callable[[Process], None] | None = None,
                 on_suspend: Callable[[int], None] | None = None, on_resume: Callable[[int], None] | None = None,
                 on_violation: Callable[[int, str], None] | None = None,
                 log_cap: int = 1 << 20, kill_grace: float = 5.0, restart_backoff: tuple[float, float] = (0.1, 5.0),
                 max_restarts: int = 5, restart_window: float = 60.0) -> None:
        self.table = table
        self.log_dir = Path(home) / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.launcher = launcher
        self.env = dict(env)
        self.on_exit, self.on_suspend, self.on_resume = on_exit, on_suspend, on_resume
        self.on_violation = on_violation
        self.log_cap = log_cap
        self.kill_grace = kill_grace
        self.restart_backoff = restart_backoff
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)     # a row became final
        self._runs: dict[int, _Run] = {}
        self._pending: dict[int, threading.Timer] = {}     # restarts waiting out their backoff
        self._recent: dict[int, deque[float]] = {}         # when each pid was last restarted
        self._waits: dict[int, Counter[int]] = {}          # wait-for graph: waiter -> targets
        self._logs: dict[int, LogFile] = {}
        self._reapers: set[threading.Thread] = set()
        self._closed = False

    def spawn(self, *, tenant: str, argv: list[str], cwd: str, name: str | None = None, ppid: int | None = None,
              key_id: str | None = None, caps=(), limits: Limits | None = None, priority: int = 0,
              weight: float = 1.0, restart: str = "never", durable: bool = False) -> Process:
        """Starts a process. `limits` None means no limits of its own: a root process is
        unbounded, a child takes its parent's. Given limits are checked against the
        parent's as they are (Limits.from_dict(..., base=parent.limits) fills in the rest)."""
        if not isinstance(cwd, str) or not os.path.isdir(cwd):
            raise InvalidRequestError(f"cwd: must be an existing directory, got {cwd!r}")
        with self._lock:
            if self._closed:
                raise LLMOSError("the supervisor has shut down")
            if ppid is not None:
                parent = self._get(ppid)
                if not parent.state.live:
                    raise InvalidRequestError(f"ppid: process {ppid} has ended")
                if parent.tenant != tenant:
                    raise InvalidRequestError(f"ppid: process {ppid} belongs to another tenant")
                limits = parent.limits if limits is None else Limits.narrow(parent.limits, limits)
                bound = parent.limits.max_children
                if bound is not None and sum(c.state.live for c in self.table.children(ppid)) >= bound:
                    raise LimitExceeded("max_children", f"process {ppid} already has {bound} live children")
            proc = self.table.create(tenant=tenant, argv=argv, cwd=os.path.abspath(cwd), name=name, ppid=ppid,
                                     key_id=key_id, caps=caps, limits=Limits() if limits is None else limits,
                                     priority=priority, weight=weight, restart=restart, durable=durable)
            try:
                return self._launch(proc, restarts=0)
            except Exception as e:
                self.table.update(proc.pid, state=ProcessState.FAILED, reason=f"spawn failed: {e}"[:256],
                                  ended=time.time())
                self.table.revoke_token(proc.pid)
                if isinstance(e, jail.JailError):
                    raise jail.JailError(f"process {proc.pid} could not be confined: {e}") from e
                raise LLMOSError(f"process {proc.pid} could not start: {e}") from e

    def kill(self, pid: int, reason: str = "killed") -> bool:
        """Ends a process and all its live descendants: SIGTERM to each process group, SIGKILL
        after kill_grace. Returns at once; `wait` sees the end. False if it had already ended."""
        if not isinstance(reason, str) or not reason or len(reason) > 64:
            raise InvalidRequestError(f"reason: must be a non-empty string of at most 64 characters, got {reason!r}")
        with self._lock:
            proc = self._get(pid)
            if not proc.state.live:
                return False
            finals = self._kill_tree(proc, reason)
        for f in finals:
            self._call(self.on_exit, f)
        return True

    def suspend(self, pid: int) -> bool:
        """Stops the process group with SIGSTOP. False unless it is running or blocked."""
        with self._lock:
            proc, run = self._get(pid), self._runs.get(pid)
            if run is None or run.reaped or run.kill_reason or proc.state not in _ACTIVE:
                return False
            _signal_group(run.os_pid, signal.SIGSTOP)
            run.resume_state = proc.state
            self.table.update(pid, state=ProcessState.SUSPENDED)
        self._call(self.on_suspend, pid)
        return True

    def resume(self, pid: int) -> bool:
        """Continues a suspended process in the state it was suspended from (blocked stays
        blocked until its system call returns). False unless it is suspended."""
        with self._lock:
            proc, run = self._get(pid), self._runs.get(pid)
            if run is None or run.reaped or proc.state is not ProcessState.SUSPENDED:
                return False
            _signal_group(run.os_pid, signal.SIGCONT)
            self.table.update(pid, state=run.resume_state)
        self._call(self.on_resume, pid)
        return True

    def renice(self, pid: int, priority: int, weight: float | None = None) -> bool:
        with self._lock:
            if not self._get(pid).state.live:
                return False
            self.table.update(pid, priority=priority, **({} if weight is None else {"weight": weight}))
            return True

    def set_state(self, pid: int, state: ProcessState | str) -> bool:
        """Marks a process blocked or running around a blocking system call. A suspended
        process stays suspended (resume will restore this state); an ended one is left alone."""
        if state not in (*_ACTIVE, *(s.value for s in _ACTIVE)):
            raise InvalidRequestError(f"state: must be one of {', '.join(s.value for s in _ACTIVE)}, got {state!r}")
        state = ProcessState(state)
        with self._lock:
            proc, run = self._get(pid), self._runs.get(pid)
            if run is None or run.reaped:
                return False
            if proc.state is ProcessState.SUSPENDED:
                run.resume_state = state
            elif proc.state in _ACTIVE:
                self.table.update(pid, state=state)
            else:
                return False
            return True

    def wait(self, pid: int, timeout: float | None = None, waiter: int | None = None) -> int | None:
        """Blocks until the process has ended for good (restarts included) and returns its
        exit code, or None after `timeout` seconds. With `waiter` (the pid of the process
        that waits) a wait that closes a cycle of waits raises DeadlockError at once."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):
            raise InvalidRequestError(f"timeout: must be a number >= 0, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            proc = self._get(pid)
            if not proc.state.live:
                return proc.exit_code
            if waiter is not None:
                cycle = self._cycle(waiter, pid)
                if cycle:
                    raise DeadlockError(f"wait would deadlock: {' -> '.join(map(str, cycle))}")
                self._waits.setdefault(waiter, Counter())[pid] += 1
            try:
                while proc.state.live:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return None
                    self._changed.wait(remaining)
                    proc = self._get(pid)
                return proc.exit_code
            finally:
                if waiter is not None:
                    self._unwait(waiter, pid)

    def recover(self) -> list[int]:
        """Call once at kernel start, before anything else. Every row a previous kernel left
        live is lost: if its OS process still runs (same pid and start time, so never a
        stranger that reuses the pid) its group is killed; the row becomes failed/"lost",
        then those with restart policy always or on-failure restart. Returns their pids."""
        now = time.time()
        with self._lock:
            stale = [p for p in self.table.list() if p.pid not in self._runs and p.pid not in self._pending]
            killed = set()
            for p in stale:
                stat = None if p.os_pid is None else _proc_stat(p.os_pid)
                if stat is not None and stat[1] == p.os_start:
                    # Even a zombie leader still holds its group id, so what it started dies too.
                    _signal_group(p.os_pid, signal.SIGKILL)
                    killed.add(p.pid)
            # Never start a second copy while the first still runs.
            deadline = time.monotonic() + self.kill_grace
            dying = [p for p in stale if p.pid in killed]
            while dying and time.monotonic() < deadline:
                time.sleep(0.01)
                dying = [p for p in dying if self._alive(p.os_pid, p.os_start)]
            restarted, finals = [], []
            for p in stale:
                self.table.revoke_token(p.pid)
                p = self.table.update(p.pid, state=ProcessState.FAILED, reason="lost", ended=now,
                                      exit_code=-signal.SIGKILL if p.pid in killed else None)
                if p.restart in ("always", "on-failure"):
                    self._recent.setdefault(p.pid, deque()).append(now)
                    try:
                        self._launch(p, restarts=p.restarts + 1)
                        restarted.append(p.pid)
                        continue
                    except Exception as e:
                        p = self.table.update(p.pid, reason=f"restart failed: {e}"[:256])
                finals.append(p)
        for p in finals:
            self._call(self.on_exit, p)
        return restarted

    def shutdown(self) -> None:
        """Kills every process this supervisor runs (reason "shutdown") and waits for them."""
        with self._lock:
            self._closed = True
            pids = sorted({*self._runs, *self._pending})
        for pid in pids:
            self.kill(pid, "shutdown")
        with self._lock:
            reapers = list(self._reapers)
        for t in reapers:
            t.join(self.kill_grace + 5.0)

    def log_path(self, pid: int) -> Path:
        return self.log_dir / f"{int(pid)}.log"

    def read_log(self, pid: int, tail_bytes: int | None = None) -> bytes:
        """The process's output kept so far (the rotated half first), or its last tail_bytes."""
        if tail_bytes is not None and (isinstance(tail_bytes, bool) or not isinstance(tail_bytes, int)
                                       or tail_bytes < 0):
            raise InvalidRequestError(f"tail_bytes: must be a non-negative integer, got {tail_bytes!r}")
        return self._log(self._get(pid).pid).read(tail_bytes)

    def _get(self, pid: int) -> Process:
        proc = self.table.get(pid)
        if proc is None:
            raise NoSuchProcess(f"no process {pid}")
        return proc

    def _log(self, pid: int) -> LogFile:
        with self._lock:
            if pid not in self._logs:
                self._logs[pid] = LogFile(self.log_path(pid), self.log_cap)
            return self._logs[pid]

    def _launch(self, proc: Process, restarts: int) -> Process:
        """Starts a run of `proc` (its first or a restart). Caller holds the lock."""
        token = self.table.issue_token(proc.pid)
        identity = dict(LLMOS_PID=str(proc.pid), LLMOS_NAME=proc.name, LLMOS_TOKEN=token, LLMOS_TENANT=proc.tenant,
                        LLMOS_RESTARTS=str(restarts))
        command = self.launcher(proc)
        if isinstance(command, jail.Plan):
            run = self._start_jailed(proc, command, identity)
        else:
            env = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
            env.update(self.env)
            env.update(identity)
            # No preexec_fn (unsafe in a threaded server): rlimits are set from outside right after.
            popen = subprocess.Popen(command, cwd=proc.cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            run = _Run(popen, proc.limits)
            self._set_rlimits(popen.pid, proc.limits)
            run.reader = self._start_pump(proc.pid, popen)
        stat = _proc_stat(run.os_pid)
        confinement = "jail/rlimits" if run.jailed else "none"
        proc = self.table.update(proc.pid, state=ProcessState.RUNNING, os_pid=run.os_pid,
                                 os_start=stat[1] if stat else None, started=time.time(), ended=None,
                                 exit_code=None, reason=None, restarts=restarts, confinement=confinement)
        self._runs[proc.pid] = run
        reaper = threading.Thread(target=self._reap, args=(proc.pid, run), daemon=True,
                                  name=f"llmos-reap-{proc.pid}")
        self._reapers.add(reaper)
        reaper.start()
        if proc.limits.max_wall is not None:
            run.timers.append(_timer(proc.limits.max_wall, self._expire, proc.pid, run))
        return proc

    def _start_pump(self, pid: int, popen: subprocess.Popen) -> threading.Thread:
        reader = threading.Thread(target=self._pump, args=(popen.stdout, self._log(pid)), daemon=True,
                                  name=f"llmos-log-{pid}")
        reader.start()
        return reader

    def _start_jailed(self, proc: Process, plan: jail.Plan, identity: dict) -> _Run:
        """Starts the jail and waits until it says it is in place; a jail that could not
        confine the process fails the start with the jail's own words."""
        plan.env.update(identity)
        started = jail.start(plan, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        run = _Run(started.popen, proc.limits, jailed=True)
        run.reader = self._start_pump(proc.pid, started.popen)
        run.listener = threading.Thread(target=self._listen, args=(proc.pid, run, started.events), daemon=True,
                                        name=f"llmos-jail-{proc.pid}")
        run.listener.start()
        if run.ready.wait(JAIL_START_TIMEOUT) and run.features is not None:
            return run
        _signal_group(run.os_pid, signal.SIGKILL)
        run.popen.wait()
        run.reader.join(5.0)
        said = [line for line in self._log(proc.pid).read(8192).decode(errors="replace").splitlines()
                if line.startswith("llmos-jail: ")]
        raise jail.JailError(said[-1][len("llmos-jail: "):] if said else
                             f"the jail did not start within {JAIL_START_TIMEOUT:g} s")

    def _listen(self, pid: int, run: _Run, events: int) -> None:
        """The jail's events: confinement in place, a refused call, the program's status."""
        try:
            for event in jail.read_events(events):
                if "features" in event:
                    run.features = event["features"]
                    run.ready.set()
                elif isinstance(event.get("seccomp"), int):
                    self._call(self.on_violation, pid, jail.syscall_name(event["seccomp"]))
                elif isinstance(event.get("exit"), int):
                    run.exit_code = event["exit"]
        finally:
            run.ready.set()

    @staticmethod
    def _set_rlimits(os_pid: int, limits: Limits) -> None:
        wanted = [(resource.RLIMIT_CORE, 0, 0)]        # a runaway agent leaves no core dumps
        if limits.max_memory is not None:
            wanted.append((resource.RLIMIT_AS, limits.max_memory, limits.max_memory))
        if limits.max_cpu is not None:
            # SIGXCPU at the soft limit; SIGKILL a second later if the agent ignores it.
            wanted.append((resource.RLIMIT_CPU, limits.max_cpu, limits.max_cpu + 1))
        for res, soft, hard in wanted:
            ceiling = resource.getrlimit(res)[1]        # no process may raise its hard limit
            if ceiling != resource.RLIM_INFINITY:
                soft, hard = min(soft, ceiling), min(hard, ceiling)
            try:
                resource.prlimit(os_pid, res, (soft, hard))
            except ProcessLookupError:
                return

    @staticmethod
    def _pump(stream: IO[bytes], logfile: LogFile) -> None:
        with stream:
            for chunk in iter(lambda: stream.read1(1 << 16), b""):
                logfile.write(chunk)

    def _reap(self, pid: int, run: _Run) -> None:
        # Wait without reaping first: while the zombie exists its pid and group id stay ours,
        # so what is left of its group (children it started) can be killed safely.
        os.waitid(os.P_PID, run.os_pid, os.WEXITED | os.WNOWAIT)
        with self._lock:
            _signal_group(run.os_pid, signal.SIGKILL)
            _, status, usage = os.wait4(run.os_pid, 0)
            run.reaped = True
            run.popen.returncode = code = os.waitstatus_to_exitcode(status)
            for t in run.timers:
                t.cancel()
        run.reader.join(2.0)
        if run.listener is not None:
            run.listener.join(2.0)
            if run.exit_code is not None:
                code = run.exit_code
        cpu = usage.ru_utime + usage.ru_stime
        state, reason = self._outcome(pid, run, code, cpu)
        with self._lock:
            self.table.add_usage(pid, cpu_seconds=cpu, peak_rss=usage.ru_maxrss * 1024)
            self.table.revoke_token(pid)
            del self._runs[pid]
            self._waits.pop(pid, None)          # its waits died with it
            proc = self._conclude(self._get(pid), state, code, reason)
        self._call(self.on_exit, proc)
        with self._lock:
            self._changed.notify_all()
            self._reapers.discard(threading.current_thread())

    def _outcome(self, pid: int, run: _Run, code: int, cpu: float) -> tuple[ProcessState, str]:
        if run.kill_reason is not None:
            return ProcessState.KILLED, run.kill_reason
        if code < 0:
            sig, max_cpu = -code, run.limits.max_cpu
            if max_cpu is not None and (sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= max_cpu)):
                return ProcessState.KILLED, "max_cpu"
            return ProcessState.FAILED, f"signal {sig}"
        if code == 0:
            return ProcessState.EXITED, "exit"
        tail = self._log(pid).read(4096)
        if run.jailed:
            last = tail.decode(errors="replace").rstrip().rsplit("\n", 1)[-1]
            for marker, reason in _LIMIT_MARKERS:
                if marker in last:
                    return ProcessState.FAILED, reason
        elif run.limits.max_memory is not None and b"MemoryError" in tail:
            return ProcessState.FAILED, "max_memory"
        return ProcessState.FAILED, f"exit {code}"

    def _conclude(self, proc: Process, state: ProcessState, code: int, reason: str) -> Process:
        """Writes how a run ended and applies the restart policy. Caller holds the lock."""
        now = time.time()
        # A kill or a limit is a decision, not a crash: restarting would undo it.
        restartable = state is not ProcessState.KILLED and reason not in _LIMIT_REASONS and not self._closed and (
            proc.restart == "always" or (proc.restart == "on-failure" and state is ProcessState.FAILED))
        if not restartable:
            return self.table.update(proc.pid, state=state, exit_code=code, reason=reason, ended=now)
        recent = self._recent.setdefault(proc.pid, deque())
        while recent and now - recent[0] > self.restart_window:
            recent.popleft()
        if len(recent) >= self.max_restarts:
            return self.table.update(proc.pid, state=ProcessState.FAILED, exit_code=code, reason="restart limit",
                                     ended=now)
        delay = min(self.restart_backoff[0] * 2 ** len(recent), self.restart_backoff[1])
        recent.append(now)
        self._pending[proc.pid] = _timer(delay, self._restart, proc.pid)
        return self.table.update(proc.pid, state=ProcessState.STARTING, exit_code=code, reason=reason, ended=None)

    def _restart(self, pid: int) -> None:
        with self._lock:
            if self._pending.pop(pid, None) is None or self._closed:
                return                          # cancelled by a kill or a shutdown
            proc = self._get(pid)
            try:
                self._launch(proc, restarts=proc.restarts + 1)
                return
            except Exception as e:
                proc = self.table.update(pid, state=ProcessState.FAILED, reason=f"restart failed: {e}"[:256],
                                         ended=time.time())
                self._changed.notify_all()
        self._call(self.on_exit, proc)

    def _kill_tree(self, proc: Process, reason: str) -> list[Process]:
        """Starts ending a live process and its live descendants, children first; returns the
        rows that became final at once. Caller holds the lock."""
        doomed = [p for p in reversed(self.table.descendants(proc.pid)) if p.state.live] + [proc]
        finals = [f for f in (self._stop(p, reason) for p in doomed) if f is not None]
        if finals:
            self._changed.notify_all()
        return finals

    def _stop(self, proc: Process, reason: str) -> Process | None:
        """Starts ending one process; returns its row if that made it final at once (it had
        no OS process: a restart was pending). Caller holds the lock."""
        run = self._runs.get(proc.pid)
        if run is not None:
            if not run.reaped and run.kill_reason is None:
                run.kill_reason = reason
                _signal_group(run.os_pid, signal.SIGTERM)
                _signal_group(run.os_pid, signal.SIGCONT)      # a stopped process cannot act on SIGTERM
                run.timers.append(_timer(self.kill_grace, self._force_kill, run))
            return None
        timer = self._pending.pop(proc.pid, None)
        if timer is not None:
            timer.cancel()
        return self.table.update(proc.pid, state=ProcessState.KILLED, reason=reason, ended=time.time())

    def _force_kill(self, run: _Run) -> None:
        with self._lock:
            if not run.reaped:
                _signal_group(run.os_pid, signal.SIGKILL)

    def _expire(self, pid: int, run: _Run) -> None:
        """max_wall: kills the run it was set for, never a later restart of the same pid."""
        with self._lock:
            if self._runs.get(pid) is not run or run.reaped:
                return
            finals = self._kill_tree(self._get(pid), "max_wall")
        for f in finals:
            self._call(self.on_exit, f)

    @staticmethod
    def _alive(os_pid: int, os_start: int | None) -> bool:
        """Whether that very OS process (not a later one with its pid) still runs."""
        stat = _proc_stat(os_pid)
        return stat is not None and stat[1] == os_start and stat[0] != "Z"

    def _cycle(self, waiter: int, target: int) -> list[int] | None:
        """The chain target -> ... -> waiter in the wait-for graph, as the cycle that adding
        waiter -> target would close, or None."""
        path, seen = [waiter, target], set()

        def reach(node: int) -> bool:
            if node == waiter:
                return True
            if node in seen:
                return False
            seen.add(node)
            for nxt in self._waits.get(node, ()):
                path.append(nxt)
                if reach(nxt):
                    return True
                path.pop()
            return False

        return path if reach(target) else None

    def _unwait(self, waiter: int, target: int) -> None:
        targets = self._waits.get(waiter)
        if targets is None:
            return
        targets[target] -= 1
        if targets[target] <= 0:
            del targets[target]
        if not targets:
            del self._waits[waiter]

    @staticmethod
    def _call(fn: Callable | None, *args) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("supervisor callback %s failed", getattr(fn, "__name__", fn))
