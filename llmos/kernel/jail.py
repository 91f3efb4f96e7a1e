"""The jail: the one confinement for every program llmos runs on a tenant's behalf, agent
processes and the python tool alike, so that a capability is a wall and not a request.

A run starts a jail process (`python -I -S -c <the _jail_* functions below>`, shipped as
source so it needs nothing from llmos and no unsafe `preexec_fn` runs in the threaded
kernel) with a plan in JSON. The jail:
- when llmos is not root, first unshares a user namespace that maps only its own uid, so
  that it may do the rest; when root, the program later drops to the plan's uid and gid
  (one per tenant for agents), with no supplementary groups;
- unshares the mount, PID, IPC and UTS namespaces, and the network namespace unless the
  plan asks for the host's network (the `net` capability): a new one holds only a loopback
  that is down, so there is no network at all;
- makes every mount read-only, puts size-limited private tmpfs scratch areas over /tmp,
  /var/tmp and /dev/shm, binds what the program needs read-only under /tmp/.llmos (the
  Python runtime, the site-packages, the llmos package, the program's own directory, the
  syscall gate's socket) and covers every hidden path ($LLMOS_HOME, the key database, the
  agents directory with every tenant's storage) with an empty tmpfs;
- forks an init (PID 1, with a private /proc) that forks the program's process: rlimits,
  the uid drop, no_new_privs, a seccomp filter, then execve. Init reaps orphans, answers
  the filter's notifications (the call fails with EPERM and init reports it) and exits
  with the program; then the namespace and everything left in it dies.

The seccomp filter (compiled by libseccomp through `pyseccomp`, a maintained ctypes binding
whose API is that of libseccomp's own Python module, which PyPI does not carry; the jail
loads the compiled program and imports no binding) refuses the calls
that widen the kernel surface or reach other processes: ptrace, mount and friends,
namespaces, bpf, perf_event_open, kexec, modules, keyrings, process_vm_*, setsid/setpgid
(a process that leaves its group would escape suspend and kill by group). Refused calls go
to init through a user-notification listener when the kernel has one, so every refusal is
seen by llmos; `clone3` fails with ENOSYS (its flags are out of a filter's reach), so libc
falls back to `clone`, whose namespace flags the filter does see.

Events flow to llmos on a pipe that only init holds (the program's process closes it before
it runs): one JSON object a line, {"features": {...}} once confinement is in place,
{"seccomp": 165, "pid": N} per refused call (its number), {"exit": code} at the end (negative: the
signal that ended the program). With `strict` (agents) any part of the confinement the OS
refuses stops the run with an error that names it; without it (the python tool) the run
degrades and the features say what was applied.

What the jail does not protect against: kernel bugs (the program shares the host kernel),
CPU side channels, reading world-readable host files outside the hidden paths (the system,
the llmos source, /sys), and resource totals (limits are rlimits, not a cgroup yet): the
process limit counts every process of the tenant's uid.
"""

from __future__ import annotations

import ast
import errno
import functools
import inspect
import marshal
import os
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field

from llmos.errors import LLMOSError

START_FAILED = 125
RUN_DIR = "/tmp/.llmos"                    # inside the jail: what is bound in for the program
PYTHON = f"{RUN_DIR}/python"               # the Python runtime (sys.base_prefix)
SITE = f"{RUN_DIR}/site"                   # the environment's site-packages
LIB = f"{RUN_DIR}/lib"                     # holds the llmos package
PROGRAM = f"{RUN_DIR}/program"             # the program's own directory
SOCKET = f"{RUN_DIR}/kernel.sock"          # the syscall gate

# Refused by the seccomp filter; each is reported to llmos when it is tried.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsmount", "fsconfig", "fspick", "move_mount",
    "open_tree", "mount_setattr", "unshare", "setns", "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "keyctl", "add_key", "request_key", "swapon", "swapoff", "reboot", "acct", "quotactl",
    "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm", "syslog", "settimeofday", "clock_settime",
    "setsid", "setpgid",
)
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                   0x00000080)   # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME


class JailError(LLMOSError):
    """The OS refused part of the confinement, so the program was not started."""


@dataclass
class Plan:
    """One confined run. Paths in `argv`, `cwd` and `binds`' targets are as the program
    sees them; `binds` maps host paths to them (read-only)."""
    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    binds: list[tuple[str, str]] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)   # jail path -> host file copied into the scratch
    network: bool = False
    uid: int | None = None             # when llmos is root: the program's uid and gid
    gid: int | None = None
    rlimits: dict[str, int] = field(default_factory=dict)
    scratch_bytes: int = 64 << 20
    strict: bool = True
    seccomp: bool = True


@dataclass
class Started:
    """A jail that runs: its process (the leader of its own process group) and the read end
    of its event pipe."""
    popen: subprocess.Popen
    events: int


def runtime_binds(with_llmos: bool) -> list[tuple[str, str]]:
    """What a Python program needs bound in: the interpreter's prefix (a venv's base lies
    under /root here, which the program's uid cannot traverse), and for agents the
    environment's site-packages and the llmos package itself, wherever its checkout is."""
    binds = [(os.path.realpath(sys.base_prefix), PYTHON)]
    if with_llmos:
        import llmos
        binds.append((os.path.realpath(sysconfig.get_paths()["purelib"]), SITE))
        binds.append((os.path.dirname(os.path.realpath(llmos.__file__)), f"{LIB}/llmos"))
    return binds


def python_in_jail() -> str:
    """The interpreter's path inside the jail."""
    return os.path.join(PYTHON, os.path.relpath(os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)))


def runtime_env() -> dict[str, str]:
    return {"LD_LIBRARY_PATH": f"{PYTHON}/lib", "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "TMPDIR": "/tmp", "HOME": "/tmp"}


def start(plan: Plan, *, stdout, stderr, cwd: str | None = None) -> Started:
    """Starts the jail on `plan`; the caller reads `events` and reaps `popen`. The plan goes
    in on stdin: it holds the process's token, and a command line is readable by every user."""
    r, w = os.pipe()
    os.set_inheritable(w, True)
    spec = {**plan.__dict__, "events_fd": w, "filters": seccomp_filters() if plan.seccomp else None}
    env = {"PATH": os.defpath, "LANG": "C.UTF-8"}
    if "LD_LIBRARY_PATH" in os.environ:
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    try:
        popen = subprocess.Popen([sys.executable, "-I", "-S", "-c", _jail_source()], stdin=subprocess.PIPE,
                                 stdout=stdout, stderr=stderr, cwd=cwd or "/", env=env, start_new_session=True,
                                 close_fds=True, pass_fds=(w,))
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        with popen.stdin:
            popen.stdin.write(marshal.dumps(spec))
    except BrokenPipeError:
        pass                      # it died at once; its status says why
    except BaseException:
        popen.kill()
        popen.wait()
        os.close(r)
        raise
    finally:
        popen.stdin = None
    return Started(popen, r)


def read_events(fd: int):
    """The jail's events as they come, until it closes the pipe (then the fd is closed)."""
    with os.fdopen(fd, "rb") as f:
        for line in f:
            try:
                event = ast.literal_eval(line.decode())
            except (ValueError, SyntaxError, UnicodeDecodeError):
                continue
            if isinstance(event, dict):
                yield event


@functools.cache
def seccomp_filters() -> dict[str, str] | None:
    """The filter, compiled once by libseccomp (through pyseccomp) into BPF programs, as hex:
    "notify" (refusals go to a listener) and "errno" (plain EPERM, for kernels without
    listeners). The jail only loads one, so it imports no binding: that saves most of the
    jail's own start-up. None when libseccomp is missing."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError, RuntimeError):
        return None

    def compiled(action: int) -> str:
        f = sc.SyscallFilter(sc.ALLOW)
        for name in DENIED_SYSCALLS:
            try:
                f.add_rule(action, name)
            except (OSError, ValueError, RuntimeError):
                pass                                    # a call this architecture does not have
        for flag in NAMESPACE_FLAGS:
            f.add_rule(action, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            return out.read().hex()
    filters = {"errno": compiled(sc.ERRNO(errno.EPERM))}
    try:
        filters["notify"] = compiled(sc.NOTIFY)
    except OSError:
        pass                                            # this kernel has no user notification
    return filters


def syscall_name(nr: int) -> str:
    """The native architecture's name for system call `nr`, as libseccomp knows it."""
    try:
        import pyseccomp as sc
        return sc.resolve_syscall(sc.Arch.NATIVE, nr).decode()
    except Exception:
        return str(nr)


@functools.cache
def _jail_source() -> str:
    parts = [inspect.getsource(f) for f in (_jail_main, _jail_libc, _jail_isolate, _jail_mount, _jail_hide,
                                            _jail_init, _jail_notify, _jail_exec, _jail_seccomp)]
    return "\n\n".join(parts) + "\n\n_jail_main()\n"


# Everything below runs in the jail process, shipped as source: each function imports what
# it needs and uses no module globals.

def _jail_main() -> None:
    """The jail's entry point: isolate, then let init run the program and pass on its status.
    The jail and init ignore the signals a graceful kill sends, so only the program gets them."""
    import _signal as signal      # not `signal`, nor json and socket: enum and re cost the jail 15 ms
    import marshal
    import os
    import sys
    plan = marshal.loads(sys.stdin.buffer.read())
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        if plan["filters"] is None and plan["seccomp"] and plan["strict"]:
            raise PermissionError("seccomp is not available: libseccomp or the pyseccomp package is missing")
        features, layout = _jail_isolate(plan)
        init = os.fork()
        if init == 0:
            _jail_init(plan, features, layout)
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    except Exception as e:  # any failure to confine is reported, never ignored
        os.write(2, f"llmos-jail: {type(e).__name__}: {e}\n".encode())
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
    """Unshare the namespaces; return what was applied and where the program will run."""
    import os
    libc = _jail_libc()
    strict = plan["strict"]
    root = os.geteuid() == 0
    uid, gid = os.geteuid(), os.getegid()
    namespaces = True
    if not root:
        try:
            libc["unshare"](0x10000000)  # CLONE_NEWUSER, mapping our own ids
        except OSError as e:
            if strict:
                raise PermissionError(f"cannot create a user namespace ({e.strerror}): llmos runs as uid {uid}, "
                                      f"and without root a user namespace is what confines agents") from None
            namespaces = False
        else:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)

    def unshare(flag: int, what: str) -> bool:
        try:
            return namespaces and libc["unshare"](flag) is None
        except OSError as e:
            if strict:
                raise PermissionError(f"cannot create a {what} namespace: {e.strerror}") from None
            return False
    network_off = plan["network"] or unshare(0x40000000, "network")   # CLONE_NEWNET: a loopback only, down
    network_off = network_off and not plan["network"]
    mounts = unshare(0x00020000, "mount")        # CLONE_NEWNS
    pids = unshare(0x20000000, "PID")            # CLONE_NEWPID: init is the next child
    unshare(0x08000000 | 0x04000000, "IPC and UTS")
    layout = _jail_mount(plan, libc, root) if mounts else {
        "filesystem": "writable", "hidden_paths": "permissions" if root else "none"}
    if layout["hidden_paths"] == "none" and plan["hidden"]:
        raise PermissionError(f"cannot hide {plan['hidden']}: no mount namespace and no uid to drop to")
    features = {
        "network": "host" if plan["network"] else ("off" if network_off else "on"),
        "uid": plan["uid"] if root and plan["uid"] is not None else uid,
        "filesystem": layout.pop("filesystem"),
        "hidden_paths": layout.pop("hidden_paths"),
        "scratch": "tmpfs" if mounts else "disk",
        "processes": "pid namespace" if pids else "process group",
        "rlimits": sorted(plan["rlimits"]),
    }
    return features, layout


def _jail_mount(plan: dict, libc: dict, root: bool) -> dict:
    """In the new mount namespace: everything read-only, private tmpfs scratch areas, the
    binds under /tmp/.llmos, the plan's files copied in, the hidden paths covered."""
    import ctypes
    import os
    import stat
    MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18

    def read_only(path: str) -> bool:   # mount_setattr(AT_FDCWD, path, AT_RECURSIVE, {MOUNT_ATTR_RDONLY})
        try:
            attr = (ctypes.c_uint64 * 4)(1, 0, 0, 0)
            libc["syscall"](442, -100, path.encode(), 0x8000, ctypes.byref(attr), ctypes.sizeof(attr))
            return True
        except OSError as e:
            if plan["strict"]:
                raise PermissionError(f"cannot make {path} read-only: {e.strerror}") from None
            return False

    libc["mount"](None, b"/", None, MS_REC | MS_PRIVATE, None)
    filesystem = "read-only" if read_only("/") else "writable"
    # Open what is bound in before the scratch areas cover it (a checkout may lie under /tmp).
    sources = [(os.open(src, os.O_PATH | os.O_CLOEXEC), dst) for src, dst in plan["binds"]]
    copies = {}
    for dst, src in plan["files"].items():
        with open(src, "rb") as f:
            copies[dst] = f.read()
    options = f"size={plan['scratch_bytes']},mode=1777".encode()
    for scratch in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(scratch):
            libc["mount"](b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options)
    os.makedirs("/tmp/.llmos", 0o755, exist_ok=True)
    for fd, dst in sources:
        os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.makedirs(dst, 0o755, exist_ok=True)
        else:
            open(dst, "wb").close()
        libc["mount"](f"/proc/self/fd/{fd}".encode(), dst.encode(), None, MS_BIND | MS_REC, None)
        os.close(fd)
        if not stat.S_ISSOCK(os.stat(dst).st_mode):
            read_only(dst)
    for dst, data in copies.items():
        os.makedirs(os.path.dirname(dst), 0o700, exist_ok=True)
        with open(dst, "wb") as f:
            f.write(data)
        if root and plan["uid"] is not None:
            os.chown(os.path.dirname(dst), plan["uid"], plan["gid"])
            os.chown(dst, plan["uid"], plan["gid"])
    _jail_hide(plan["hidden"], libc)
    return {"filesystem": filesystem, "hidden_paths": "tmpfs"}


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
    """PID 1 of the new namespace: mount its /proc, report the features, start the program,
    answer its filter's notifications, and reap orphans until the program exits."""
    import _signal as signal
    import _socket
    import array
    import os
    libc = _jail_libc()
    events = plan["events_fd"]

    def report(event: dict) -> None:     # one Python literal a line (repr escapes newlines)
        try:
            os.write(events, repr(event).encode() + b"\n")
        except OSError:
            pass
    try:
        libc["prctl"](1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG: die with the jail
        features["proc"] = "host"
        if features["processes"] == "pid namespace" and features["scratch"] == "tmpfs":
            try:
                libc["mount"](b"proc", b"/proc", b"proc", 2 | 4 | 8, None)
                features["proc"] = "private"
            except OSError as e:
                if plan["strict"]:
                    raise PermissionError(f"cannot mount a private /proc: {e.strerror}") from None
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        user = os.fork()
        if user == 0:
            ours.close()
            _jail_exec(plan, theirs, libc)
        theirs.close()
        try:
            said, ancillary, _, _ = ours.recvmsg(16, _socket.CMSG_SPACE(array.array("i").itemsize))
        except OSError:
            said, ancillary = b"", []
        fds = [array.array("i", data)[0] for level, kind, data in ancillary
               if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS]
        ours.close()
        if not said:
            os._exit(125)      # the program's process said why on stderr, and could not start
        features["seccomp"] = "notify" if fds else "errno" if said == b"e" else "off"
        report({"features": features})
        if fds:
            import _thread
            _thread.start_new_thread(_jail_notify, (fds[0], report))
    except Exception as e:
        os.write(2, f"llmos-jail: {type(e).__name__}: {e}\n".encode())
        os._exit(125)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == user:
            code = os.waitstatus_to_exitcode(status)
            report({"exit": code})
            os._exit(code if code >= 0 else 128 - code)


def _jail_notify(fd: int, report) -> None:
    """Answer each refused call of the program's processes with EPERM, and report it."""
    import ctypes
    import errno
    import os
    lib = ctypes.CDLL("libseccomp.so.2")

    class Data(ctypes.Structure):
        _fields_ = [("nr", ctypes.c_int), ("arch", ctypes.c_uint32), ("ip", ctypes.c_uint64),
                    ("args", ctypes.c_uint64 * 6)]

    class Notif(ctypes.Structure):
        _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("data", Data)]

    class Resp(ctypes.Structure):
        _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                    ("flags", ctypes.c_uint32)]
    req, resp = ctypes.POINTER(Notif)(), ctypes.POINTER(Resp)()
    if lib.seccomp_notify_alloc(ctypes.byref(req), ctypes.byref(resp)) != 0:
        os.close(fd)                                   # refused calls then fail with ENOSYS
        return
    while True:
        ctypes.memset(req, 0, ctypes.sizeof(Notif))     # the kernel refuses a request buffer not zeroed
        rc = lib.seccomp_notify_receive(fd, req)
        if rc != 0:
            if -rc == errno.EINTR:
                continue
            os.close(fd)
            return
        resp.contents.id, resp.contents.val, resp.contents.error, resp.contents.flags = req.contents.id, 0, \
            -errno.EPERM, 0
        lib.seccomp_notify_respond(fd, resp)           # ENOENT: the caller died meanwhile
        report({"seccomp": req.contents.data.nr, "pid": req.contents.pid})


def _jail_exec(plan: dict, channel, libc: dict) -> None:
    """The program's process: limits, its uid, no_new_privs, the filter, then execve."""
    import _signal as signal
    import os
    import resource
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.set_inheritable(plan["events_fd"], False)
        os.close(plan["events_fd"])
        for name, value in plan["rlimits"].items():
            hard = value + 1 if name == "CPU" else value  # SIGXCPU first, SIGKILL a second later
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, hard))
        if os.geteuid() == 0 and plan["uid"] is not None:
            os.setgroups([])
            os.setgid(plan["gid"])
            os.setuid(plan["uid"])
        libc["prctl"](38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        libc["prctl"](1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG, cleared by setuid
        try:
            os.chdir(plan["cwd"])
            os.listdir(plan["cwd"])
        except PermissionError:
            raise PermissionError(f"uid {os.getuid()} may not read the program's directory (bound at "
                                  f"{plan['cwd']}): make it readable by others (chmod o+rx), or store the "
                                  f"program in the tenant's storage") from None
        if plan["filters"] is not None:
            _jail_seccomp(plan["filters"], channel)
        else:
            channel.sendall(b"o")
        channel.close()
        env = dict(plan["env"])
        os.execve(plan["argv"][0], plan["argv"], env)
    except Exception as e:
        os.write(2, f"llmos-jail: cannot start the program: {type(e).__name__}: {e}\n".encode())
        os._exit(125)


def _jail_seccomp(filters: dict, channel) -> None:
    """Load the compiled filter; with a notification listener, hand its fd to init and
    keep none."""
    import _socket
    import array
    import ctypes
    import os

    class Program(ctypes.Structure):            # struct sock_fprog
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    libc = ctypes.CDLL(None, use_errno=True)

    def load(code: str, flags: int) -> int:
        bpf = ctypes.create_string_buffer(bytes.fromhex(code))
        prog = Program(len(bpf.raw) // 8, ctypes.addressof(bpf))
        # seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog); a listener's fd is the result
        fd = libc.syscall(317, 1, flags, ctypes.byref(prog))
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"seccomp: {os.strerror(ctypes.get_errno())}")
        return fd
    if "notify" in filters:
        try:
            fd = load(filters["notify"], 1 << 3)   # SECCOMP_FILTER_FLAG_NEW_LISTENER
        except OSError:
            pass
        else:
            channel.sendmsg([b"n"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [fd]))])
            os.close(fd)
            return
    load(filters["errno"], 0)
    channel.sendall(b"e")
