"""The `python` tool: run code an LLM wrote in a separate, confined process.

How a run is confined. The kernel writes the code to a fresh temporary directory and starts
a jail process (`python -I -S`, clean environment) whose program is the `_jail_*` functions
below, shipped as source so that it needs nothing from llmos at run time and no unsafe
`preexec_fn` runs in the (threaded) kernel. The jail:
- unshares the network namespace (only a loopback that is down: no network at all), the
  mount namespace and the PID namespace; when not root it first unshares a user namespace
  (mapping only its own uid) so that it may do the rest;
- in its mount namespace makes every existing mount read-only, mounts private tmpfs
  scratch areas of SCRATCH_BYTES over /tmp, /var/tmp and /dev/shm (the code's working
  directory is /tmp/work, gone with the namespace), binds the Python runtime read-only at
  /tmp/python, and covers each of `hidden_paths` (the kernel's $LLMOS_HOME with its key
  database) with an empty tmpfs, or a hidden file with /dev/null;
- forks an init process (PID 1 of the new PID namespace, with a private /proc) which forks
  the code's process: rlimits on CPU time, address space, file size, open files, processes
  (threads count) and core dumps; when root, the uid and gid of `nobody` with no
  supplementary groups; no_new_privs (setuid programs gain nothing); killed if its parent
  dies; then `python -I -S main.py`.
When the code's process ends, init ends and the kernel kills whatever is left in the PID
namespace, so a fork bomb or a daemonised child never outlives the run. The kernel reads
stdout with a cap, kills the jail's process group at the wall-clock deadline and removes
the temporary directory. Where the OS refuses a namespace the run degrades (a process group
instead of a PID namespace, a shared network, a writable disk) and `sandbox_features()`
says what was actually applied; hidden paths that can be neither covered nor protected by a
uid change make the run refuse to start rather than expose them.

What the sandbox does not protect against:
- kernel bugs: the code shares the host kernel (no seccomp filter, no VM) and may itself
  create user namespaces, which widens the kernel surface it can reach; that the hidden
  paths stay covered rests on the kernel locking inherited mounts;
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
  directories (each file capped by the file-size limit), escape from the process group
  with setsid(), and, when not root, reads of everything llmos's uid can read.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import pwd
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from llmos import validate
from llmos.errors import InvalidRequestError, LLMOSError

SCRATCH_BYTES = 32 << 20
OPEN_FILES = 64
STDERR_KEEP = 16 << 10
START_FAILED = 125
FEATURES_TAG = b"llmos-sandbox-features: "

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
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        plan = _plan(workdir, limits, hidden_paths)
        env = {"PATH": os.defpath, "LANG": "C.UTF-8"}
        if "LD_LIBRARY_PATH" in os.environ:
            env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _jail_source(), json.dumps(plan)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=workdir, env=env, start_new_session=True, close_fds=True)
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
    features = {}
    if stderr.startswith(FEATURES_TAG):
        line, _, stderr = bytes(stderr).partition(b"\n")
        features = json.loads(line[len(FEATURES_TAG):])
    return Outcome(status if status >= 0 else 128 - status, bytes(stdout), bytes(stderr), stopped, features)


def _plan(workdir: str, limits: Limits, hidden_paths: list[str]) -> dict:
    """Everything the jail needs, as JSON: it imports nothing from llmos."""
    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid = gid = 65534
    return {
        "workdir": workdir, "python": os.path.realpath(sys.executable),
        "prefix": os.path.realpath(sys.base_prefix), "uid": uid, "gid": gid,
        "hidden": [os.path.realpath(p) for p in hidden_paths], "scratch_bytes": SCRATCH_BYTES,
        "rlimits": {"CPU": math.ceil(limits.cpu_seconds), "AS": limits.memory_bytes,
                    "FSIZE": SCRATCH_BYTES, "NOFILE": OPEN_FILES, "NPROC": limits.max_processes,
                    "CORE": 0},
    }


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
                    head = err[:err.find(b"\n") + 1] if err.startswith(FEATURES_TAG) else b""
                    err[:] = head + err[-STDERR_KEEP:]
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
    if status == START_FAILED and tail.startswith("llmos-sandbox: "):
        raise SandboxError(f"the sandbox could not start: {tail[len('llmos-sandbox: '):]}")
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


@functools.cache
def _jail_source() -> str:
    parts = [inspect.getsource(f) for f in (_jail_main, _jail_libc, _jail_isolate, _jail_mount,
                                            _jail_hide, _jail_init, _jail_exec)]
    return "\n\n".join(parts) + "\n\n_jail_main()\n"


# Everything below runs in the jail process, shipped as source: each function imports what
# it needs and uses no module globals.

def _jail_main() -> None:
    """The jail's entry point: isolate, then let init run the code and pass on its status."""
    import json
    import os
    import sys
    plan = json.loads(sys.argv[1])
    try:
        features, layout = _jail_isolate(plan)
        init = os.fork()
        if init == 0:
            _jail_init(plan, features, layout)
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    except Exception as e:  # any failure to confine is reported, never ignored
        os.write(2, f"llmos-sandbox: {type(e).__name__}: {e}\n".encode())
        os._exit(125)


def _jail_libc():
    """libc.unshare, mount, prctl and syscall, raising OSError on failure."""
    import ctypes
    import os
    libc = ctypes.CDLL(None, use_errno=True)

    def checked(name):
        function = getattr(libc, name)

        def call(*args):
            if function(*args) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"{name}: {os.strerror(errno)}")
        return call
    return {name: checked(name) for name in ("unshare", "mount", "prctl", "syscall")}


def _jail_isolate(plan: dict) -> tuple[dict, dict]:
    """Unshare what the OS allows; return what was applied and where the code will run."""
    import os
    libc = _jail_libc()
    root = os.geteuid() == 0
    uid, gid = os.geteuid(), os.getegid()
    namespaces = True
    if not root:
        try:
            libc["unshare"](0x10000000)  # CLONE_NEWUSER, mapping our own ids
        except OSError:
            namespaces = False
        else:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)

    def unshare(flag: int) -> bool:
        try:
            return namespaces and libc["unshare"](flag) is None
        except OSError:
            return False
    network_off = unshare(0x40000000)  # CLONE_NEWNET: a loopback only, and down
    mounts = unshare(0x00020000)       # CLONE_NEWNS
    pids = unshare(0x20000000)         # CLONE_NEWPID: init is the next child
    layout = _jail_mount(plan, libc, root) if mounts else {
        "cwd": plan["workdir"], "python": plan["python"], "env": {}, "filesystem": "writable",
        "hidden_paths": "permissions" if root else "none", "unreachable": plan["hidden"]}
    if layout["hidden_paths"] == "none" and plan["hidden"]:
        raise PermissionError(f"cannot hide {plan['hidden']}: no mount namespace and no uid to drop to")
    if not mounts and root:
        os.chown(plan["workdir"], plan["uid"], plan["gid"])
        os.chown(os.path.join(plan["workdir"], "main.py"), plan["uid"], plan["gid"])
    features = {
        "network": "off" if network_off else "on",
        "uid": plan["uid"] if root else uid,
        "filesystem": layout.pop("filesystem"),
        "hidden_paths": layout.pop("hidden_paths"),
        "scratch": "tmpfs" if mounts else "disk",
        "processes": "pid namespace" if pids else "process group",
        "rlimits": sorted(plan["rlimits"]),
    }
    return features, layout


def _jail_mount(plan: dict, libc: dict, root: bool) -> dict:
    """In the new mount namespace: everything read-only, private tmpfs scratch areas, the
    Python runtime bound where the code's uid can reach it, the hidden paths covered."""
    import ctypes
    import os
    MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
    with open(os.path.join(plan["workdir"], "main.py"), "rb") as f:
        code = f.read()
    libc["mount"](None, b"/", None, MS_REC | MS_PRIVATE, None)
    filesystem = "read-only"
    try:  # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {attr_set: MOUNT_ATTR_RDONLY}, 32)
        attr = (ctypes.c_uint64 * 4)(1, 0, 0, 0)
        libc["syscall"](442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.sizeof(attr))
    except OSError:
        filesystem = "writable"
    options = f"size={plan['scratch_bytes']},mode=1777".encode()
    for scratch in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(scratch):
            libc["mount"](b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options)
    runtime, cwd = "/tmp/python", "/tmp/work"
    os.mkdir(runtime)
    os.mkdir(cwd, 0o700)
    libc["mount"](plan["prefix"].encode(), runtime.encode(), None, MS_BIND | MS_REC, None)
    _jail_hide(plan["hidden"], libc)
    with open(os.path.join(cwd, "main.py"), "wb") as f:
        f.write(code)
    if root:
        os.chown(cwd, plan["uid"], plan["gid"])
        os.chown(os.path.join(cwd, "main.py"), plan["uid"], plan["gid"])
    python = os.path.join(runtime, os.path.relpath(plan["python"], plan["prefix"]))
    return {"cwd": cwd, "python": python, "env": {"LD_LIBRARY_PATH": os.path.join(runtime, "lib")},
            "filesystem": filesystem, "hidden_paths": "tmpfs"}


def _jail_hide(paths: list, libc: dict) -> None:
    """Cover each hidden directory with an empty read-only tmpfs and each hidden file with
    /dev/null; a path that cannot be covered stops the run."""
    import os
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND = 1, 2, 4, 8, 4096
    for path in paths:
        if os.path.isdir(path):
            libc["mount"](b"tmpfs", path.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          b"size=4k,mode=000")
        elif os.path.lexists(path):
            libc["mount"](b"/dev/null", path.encode(), None, MS_BIND, None)


def _jail_init(plan: dict, features: dict, layout: dict) -> None:
    """PID 1 of the new namespace: mount its /proc, report the features, start the code
    and reap orphans until the code's process exits; then the namespace dies with it."""
    import json
    import os
    import signal
    libc = _jail_libc()
    libc["prctl"](1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG: die with the jail
    features["proc"] = "host"
    if features["processes"] == "pid namespace" and features["scratch"] == "tmpfs":
        try:
            libc["mount"](b"proc", b"/proc", b"proc", 2 | 4 | 8, None)
            features["proc"] = "private"
        except OSError:
            pass
    os.write(2, b"llmos-sandbox-features: " + json.dumps(features).encode() + b"\n")
    user = os.fork()
    if user == 0:
        _jail_exec(plan, layout, libc)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == user:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def _jail_exec(plan: dict, layout: dict, libc: dict) -> None:
    """The code's process: limits, an unprivileged uid, then a fresh isolated interpreter."""
    import os
    import resource
    import signal
    try:
        for name, value in plan["rlimits"].items():
            hard = value + 1 if name == "CPU" else value  # SIGXCPU first, SIGKILL a second later
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, hard))
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(plan["gid"])
            os.setuid(plan["uid"])
        for path in layout.get("unreachable", ()):  # hidden by file modes only: check them
            if os.access(path, os.R_OK) or os.access(path, os.X_OK):
                raise PermissionError(f"hidden path {path} is readable by uid {os.getuid()}")
        libc["prctl"](38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        libc["prctl"](1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG, cleared by setuid
        os.chdir(layout["cwd"])
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": layout["cwd"], "TMPDIR": "/tmp",
               "LANG": "C.UTF-8", **layout["env"]}
        os.execve(layout["python"], [layout["python"], "-I", "-S", "main.py"], env)
    except Exception as e:
        os.write(2, f"llmos-sandbox: cannot start the code: {type(e).__name__}: {e}\n".encode())
        os._exit(125)
