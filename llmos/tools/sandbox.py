"""The `python` tool: run code an LLM wrote in a separate, confined process.

How a run is confined: in the jail every agent process runs in too (llmos/kernel/jail.py),
so there is one confinement to get right. The kernel writes the code to a fresh temporary
directory; the jail copies it into its private scratch (/tmp/work, gone with the mount
namespace) and runs `python -I -S main.py` there as `nobody` (when llmos is root), with no
network, a read-only host, the hidden paths (the kernel's $LLMOS_HOME with its key
database) covered, a private /proc in its own PID namespace, the seccomp filter, and
rlimits on CPU time, address space, file size, open files, processes (threads count) and
core dumps. When the code's process ends, init ends and the kernel kills whatever is left
in the PID namespace, so a fork bomb or a daemonised child never outlives the run. The
kernel reads stdout with a cap, kills the jail's process group at the wall-clock deadline
and removes the temporary directory. Unlike an agent's, a run degrades where the OS
refuses a namespace (a process group instead of a PID namespace, a shared network, a
writable disk) and `sandbox_features()` says what was actually applied; hidden paths that
can be neither covered nor protected by a uid change make the run refuse to start.

What the sandbox does not protect against:
- kernel bugs: the code shares the host kernel (a seccomp filter narrows what it can reach,
  but there is no VM); that the hidden paths stay covered rests on the kernel locking
  inherited mounts;
- CPU side channels (Spectre-class, cache timing) and timing of co-located work;
- information readable by the code's uid: world-readable files (the llmos source, /etc,
  system libraries, installed packages), /sys and the host-wide parts of /proc (cpuinfo,
  meminfo, load, uptime, mounts); only the hidden paths are covered. When llmos does not
  run as root the code keeps llmos's own uid, so it can read (not write) every file llmos
  can read outside the hidden paths;
- resource totals: limits are per process, so N processes may hold N times the memory
  limit and keep N cores busy until the wall-clock deadline; the address-space limit counts
  virtual memory, thread stacks included; when root, the process limit counts all
  processes of `nobody`, so concurrent runs share it (and a run can be refused by others);
- memory spent on scratch files: the three tmpfs areas live in RAM, 3 x SCRATCH_BYTES per
  run at most;
- where the OS refuses the namespaces: network access, writes to world-writable
  directories (each file capped by the file-size limit), and, when not root, reads of
  everything llmos's uid can read.
"""

from __future__ import annotations

import functools
import math
import os
import pwd
import selectors
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from llmos import validate
from llmos.errors import InvalidRequestError, LLMOSError
from llmos.kernel import jail

SCRATCH_BYTES = 32 << 20
OPEN_FILES = 64
STDERR_KEEP = 16 << 10
START_FAILED = jail.START_FAILED
WORKDIR = "/tmp/work"

# The last line of stderr that shows the code hit a limit, and which limit.
LIMIT_ERRORS = (
    ("MemoryError", "memory limit of {memory} MiB exceeded"),
    ("[Errno 11] Resource temporarily unavailable", "process limit of {processes} reached"),
    ("can't start new thread", "process limit of {processes} reached (threads count)"),
    ("[Errno 27]", "file size limit of {scratch} MiB exceeded"),
    ("[Errno 28]", "scratch space of {scratch} MiB is full"),
)


class SandboxError(LLMOSError):
    """The python tool could not run the code to completion."""


class SandboxTimeout(SandboxError):
    """The code ran past its wall-clock timeout or its CPU-time limit."""


class SandboxLimit(SandboxError):
    """The code exceeded a resource limit: memory, output size, files or processes."""


class SandboxFailed(SandboxError):
    """The code raised or exited non-zero; the message ends with its last stderr lines."""


@dataclass
class Limits:
    """What one run may use."""
    timeout: float
    cpu_seconds: float
    memory_bytes: int
    output_bytes: int
    max_processes: int


@dataclass
class Outcome:
    """How the jail ended: exit status (128+N for signal N), captured output, and why the
    kernel stopped it early ("timeout", "output"), if it did."""
    status: int
    stdout: bytes
    stderr: bytes
    stopped: str | None
    features: dict = field(default_factory=dict)


def run_python(code: str, timeout: float = 10, *, cpu_seconds: float | None = None,
               memory_bytes: int = 256 << 20, output_bytes: int = 64 << 10, max_processes: int = 16,
               hidden_paths: list[str] = ()) -> str:
    """Run `code` in the sandbox and return what it printed on stdout."""
    if not isinstance(code, str):
        raise InvalidRequestError(f"code: must be a string, got {type(code).__name__}")
    limits = Limits(
        timeout=validate.number("timeout", timeout, 0, 3600, lo_open=True),
        cpu_seconds=validate.number("cpu_seconds", timeout if cpu_seconds is None else cpu_seconds,
                                    0, 3600, lo_open=True),
        memory_bytes=validate.integer("memory_bytes", memory_bytes, 32 << 20),
        output_bytes=validate.integer("output_bytes", output_bytes, 1),
        max_processes=validate.integer("max_processes", max_processes, 1, 4096))
    return _verdict(_run(code, limits, list(hidden_paths)), limits)


@functools.cache
def sandbox_features() -> dict:
    """What confinement this machine actually gives a run, measured by running one:
    e.g. {"network": "off", "uid": 65534, "hidden_paths": "tmpfs", ...}."""
    outcome = _run("", Limits(10, 10, 256 << 20, 1024, 16), [])
    if not outcome.features:
        raise SandboxError(f"the sandbox could not start: {_tail(outcome.stderr)}")
    return outcome.features


def _run(code: str, limits: Limits, hidden_paths: list[str]) -> Outcome:
    """Start the jail on `code` and collect what it did, stopping it at the deadline."""
    deadline = time.monotonic() + limits.timeout
    with tempfile.TemporaryDirectory(prefix="llmos-sandbox-") as workdir:
        main = os.path.join(workdir, "main.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(code)
        started = jail.start(_plan(main, limits, hidden_paths), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=workdir)
        proc, events = started.popen, []
        listener = threading.Thread(target=lambda: events.extend(jail.read_events(started.events)), daemon=True)
        listener.start()
        try:
            stdout, stderr, stopped = _collect(proc, deadline, limits.output_bytes)
            if stopped is None:  # the code may have closed its pipes and still be running
                proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped = "timeout"
        finally:
            _kill_group(proc)
            proc.stdout.close()
            proc.stderr.close()
        status = proc.wait()
        listener.join(5.0)
    features = next((e["features"] for e in events if "features" in e), {})
    return Outcome(status if status >= 0 else 128 - status, bytes(stdout), bytes(stderr), stopped, features)


def _plan(main: str, limits: Limits, hidden_paths: list[str]) -> jail.Plan:
    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid = gid = 65534
    return jail.Plan(
        argv=[jail.python_in_jail(), "-I", "-S", "main.py"], cwd=WORKDIR,
        env={**jail.runtime_env(), "HOME": WORKDIR}, binds=jail.runtime_binds(with_llmos=False),
        hidden=[os.path.realpath(p) for p in hidden_paths], files={f"{WORKDIR}/main.py": main},
        uid=uid, gid=gid, scratch_bytes=SCRATCH_BYTES, strict=False,
        rlimits={"CPU": math.ceil(limits.cpu_seconds), "AS": limits.memory_bytes, "FSIZE": SCRATCH_BYTES,
                 "NOFILE": OPEN_FILES, "NPROC": limits.max_processes, "CORE": 0})


def _collect(proc: subprocess.Popen, deadline: float, output_bytes: int) -> tuple[bytearray, bytearray, str | None]:
    """Read stdout and stderr together until both close; stop early at the deadline or
    once stdout passes its cap. Only the tail of stderr is kept."""
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return out, err, "timeout"
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if key.data is out and len(out) > output_bytes:
                    return out, err, "output"
                if key.data is err and len(err) > 2 * STDERR_KEEP:
                    err[:] = err[-STDERR_KEEP:]
    return out, err, None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the jail's process group before the jail is reaped, so its id cannot have
    been reused; the PID namespace takes care of processes that left the group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _verdict(outcome: Outcome, limits: Limits) -> str:
    """The code's stdout, or the SandboxError that says why there is none."""
    if outcome.stopped == "timeout":
        raise SandboxTimeout(f"wall-clock timeout of {limits.timeout:g} s exceeded")
    if outcome.stopped == "output":
        raise SandboxLimit(f"output limit of {limits.output_bytes} bytes exceeded")
    status, tail = outcome.status, _tail(outcome.stderr)
    if status == START_FAILED and tail.startswith("llmos-jail: "):
        raise SandboxError(f"the sandbox could not start: {tail[len('llmos-jail: '):]}")
    if status == 128 + signal.SIGXCPU:
        raise SandboxTimeout(f"CPU time limit of {math.ceil(limits.cpu_seconds)} s exceeded")
    if status == 128 + signal.SIGKILL:  # the hard CPU limit, one second past the soft one
        raise SandboxTimeout(f"CPU time limit of {math.ceil(limits.cpu_seconds)} s exceeded (killed)")
    if status - 128 in signal.valid_signals():
        raise SandboxFailed(f"the code was killed by {signal.Signals(status - 128).name}\n{tail}".rstrip())
    if status != 0:
        last = tail.rstrip().rsplit("\n", 1)[-1]
        for marker, message in LIMIT_ERRORS:
            if marker in last:
                raise SandboxLimit(message.format(memory=limits.memory_bytes >> 20, scratch=SCRATCH_BYTES >> 20,
                                                  processes=limits.max_processes) + f": {last}")
        raise SandboxFailed(f"the code exited with status {status}:\n{tail}")
    return outcome.stdout.decode("utf-8", errors="replace")


def _tail(stderr: bytes, lines: int = 20, chars: int = 4000) -> str:
    return "\n".join(stderr.decode("utf-8", errors="replace").rstrip().split("\n")[-lines:])[-chars:]
