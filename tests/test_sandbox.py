"""The calculator and python tools refuse what they must: every check here is an attack
or a mistake an LLM could send, and what the tool does with it."""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from llmos.errors import InvalidRequestError
from llmos.tools.calculator import CalculatorError, calculate
from llmos.tools.sandbox import (SandboxError, SandboxFailed, SandboxLimit, SandboxTimeout, run_python,
                                 sandbox_features)


@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2 ** 3 ** 2", 512), ("-2 ** 2", -4), ("2 - 3 - 4", -5),
    ("7 // 2", 3), ("-7 // 2", -4), ("7 % 3", 1), ("10 / 4", 2.5), ("+5", 5), ("1.5e3", 1500.0),
    ("sqrt(16) + abs(-3)", 7.0), ("max(1, 5, 3) - min(4, 2)", 3), ("round(2.567, 2)", 2.57),
    ("floor(2.7) + ceil(2.1)", 5), ("log(8, 2)", 3.0), ("log10(1000)", 3.0), ("exp(0)", 1.0),
    ("cos(0) + sin(0) + tan(0)", 1.0), ("2 ** -1", 0.5), ("  3 * 4 ", 12),
])
def test_calculator_computes(expression, value):
    assert calculate(expression) == pytest.approx(value)
    assert type(calculate(expression)) is type(value)


def test_calculator_constants():
    assert calculate("pi") == pytest.approx(3.141592653589793)
    assert calculate("log(e)") == pytest.approx(1.0)


@pytest.mark.parametrize("expression, message", [
    ("1 / 0", "division by zero"), ("5 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("foo + 1", "unknown name 'foo'"), ("__import__('os')", "unknown function '__import__'"),
    ("(1).real", "unsupported syntax: attribute access"), ("x[0]", "unsupported syntax: subscript"),
    ("().__class__", "unsupported syntax: attribute access"), ("lambda: 1", "unsupported syntax: lambda"),
    ("1 < 2", "unsupported syntax: comparison"), ("'a' * 3", "unsupported syntax: string"),
    ("1 if 1 else 2", "unsupported syntax: conditional"), ("[1][0]", "unsupported syntax"),
    ("1 << 3", "unsupported syntax: operator LShift"), ("True + 1", "unsupported syntax: constant True"),
    ("1j", "constant 1j"), ("sqrt(x=4)", "keyword arguments"), ("sqrt(1, 2)", "takes 1 argument"),
    ("sqrt(-1)", "math domain error"), ("(-8) ** 0.5", "not a real number"),
    ("9 ** 9 ** 9", "exponent too large"), ("10 ** 100000", "exponent too large"),
    ("(10 ** 3000) * (10 ** 3000)", "number too large"), ("exp(1000)", "result too large"),
    ("2.0 ** 100000", "result too large"), ("1e308 * 10", "result too large"),
    ("round(5, -10 ** 9)", "round: digits"), ("1 +", "syntax error"), ("", "empty expression"),
    ("1" * 1001, "expression too long"), ("-" * 500 + "1", "nested too deeply"),
    ("(" * 150 + "1" + "+1)" * 150, "nested too deeply"),
    ("(" * 300 + "1" + ")" * 300, "too many nested parentheses"), ("a := 1", "syntax error"), ("1\x00", "null bytes"),
])
def test_calculator_refuses(expression, message):
    with pytest.raises(CalculatorError, match=re.escape(message)):
        calculate(expression)


def test_calculator_error_says_where_and_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="unknown name 'foo' at column 5"):
        calculate("1 + foo")


def test_calculator_never_evaluates(monkeypatch):
    """Parsing is the only use of the compiler: to a tree (PyCF_ONLY_AST), never to code."""
    import ast
    import builtins
    real_compile = builtins.compile

    def tree_only(source, filename, mode, flags=0, *args, **kwargs):
        assert flags & ast.PyCF_ONLY_AST, "compiled to code"
        return real_compile(source, filename, mode, flags, *args, **kwargs)
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval was called"))
    monkeypatch.setattr(builtins, "exec", lambda *a, **k: pytest.fail("exec was called"))
    monkeypatch.setattr(builtins, "compile", tree_only)
    assert calculate("2 * (3 + 4)") == 14
    with pytest.raises(CalculatorError, match="unknown function '__import__'"):
        calculate("__import__('os')")
    with pytest.raises(CalculatorError, match="unsupported syntax: call of a non-function"):
        calculate("__import__('os').system('echo hacked')")


def test_python_returns_what_was_printed():
    assert run_python("print('hello'); print(6 * 7)") == "hello\n42\n"


def test_python_exception_is_a_failure_with_traceback():
    with pytest.raises(SandboxFailed) as failure:
        run_python("def f():\n    return 1 / 0\nf()\n")
    assert "ZeroDivisionError: division by zero" in str(failure.value)
    assert "line 2, in f" in str(failure.value)
    with pytest.raises(SandboxFailed, match="status 3"):
        run_python("import sys; sys.exit(3)")


def test_python_infinite_loop_times_out():
    start = time.monotonic()
    with pytest.raises(SandboxTimeout, match="wall-clock timeout of 1 s"):
        run_python("while True: pass", timeout=1)
    assert time.monotonic() - start < 3


def test_python_cpu_limit():
    start = time.monotonic()
    with pytest.raises(SandboxTimeout, match="CPU time limit of 1 s"):
        run_python("while True: pass", timeout=10, cpu_seconds=1)
    assert time.monotonic() - start < 5


def test_python_sleeping_code_is_stopped_by_the_wall_clock():
    with pytest.raises(SandboxTimeout):
        run_python("import time; print('started', flush=True); time.sleep(60)", timeout=1)


def test_python_memory_bomb_hits_the_limit():
    with pytest.raises(SandboxLimit, match="memory limit of 64 MiB"):
        run_python("x = bytearray(1 << 30)", memory_bytes=64 << 20)
    with pytest.raises(SandboxLimit, match="memory limit"):
        run_python("a = []\nwhile True: a.append(' ' * 10**6)", memory_bytes=64 << 20)


def test_python_output_flood_is_capped():
    start = time.monotonic()
    with pytest.raises(SandboxLimit, match="output limit of 10000 bytes"):
        run_python("while True: print('x' * 1000)", output_bytes=10_000)
    assert time.monotonic() - start < 3


def test_python_file_size_is_capped():
    with pytest.raises(SandboxLimit, match="file size limit|scratch space"):
        run_python("open('big', 'wb').write(b'x' * (40 << 20))")


def _processes_named(name: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                found.append(int(pid))
        except OSError:
            pass
    return found


BOMB = """
import ctypes, os
ctypes.CDLL(None).prctl(15, b"{name}", 0, 0, 0)  # PR_SET_NAME, inherited by every fork
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


def test_python_fork_bomb_is_contained_and_cleaned_up():
    name = f"bomb{os.getpid() % 100000}"
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], len(_processes_named(name)))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(SandboxTimeout):
            run_python(BOMB.format(name=name), timeout=2, max_processes=8)
    finally:
        stop.set()
        watcher.join()
    assert 1 <= peak[0] <= 8
    _assert_gone(name)


def test_python_daemonised_child_does_not_outlive_the_run():
    name = f"daemon{os.getpid() % 100000}"
    code = f"""
import ctypes, os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        ctypes.CDLL(None).prctl(15, b"{name}", 0, 0, 0)
        time.sleep(60)
    os._exit(0)
time.sleep(0.3)
print("parent done")
"""
    if sandbox_features()["processes"] != "pid namespace":
        pytest.skip("no PID namespace here: a setsid() daemon can escape")
    assert run_python(code) == "parent done\n"
    _assert_gone(name)


def _assert_gone(name: str) -> None:
    deadline = time.monotonic() + 3
    while _processes_named(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_named(name) == []


@pytest.fixture
def secret_dir():
    """A world-readable directory outside the scratch areas the sandbox covers anyway, so
    only hidden_paths can keep the sandbox from reading it."""
    path = Path(tempfile.mkdtemp(prefix=".sandbox-secret-", dir=Path(__file__).parent))
    try:
        path.chmod(0o755)
        (path / "keys.db").write_text("SECRET-7f3a9c")
        (path / "keys.db").chmod(0o644)
        yield path
    finally:
        shutil.rmtree(path)


def _under_scratch(path: Path) -> bool:
    """Whether the sandbox covers this path with its own scratch space anyway (a checkout
    under /tmp, as a CI clone may be): then it is invisible inside whether hidden or not."""
    return any(str(path).startswith(area) for area in ("/tmp/", "/var/tmp/", "/dev/shm/"))


def test_python_cannot_read_hidden_paths(secret_dir):
    code = f"print(open({str(secret_dir / 'keys.db')!r}).read())"
    if sandbox_features()["hidden_paths"] == "tmpfs" and not _under_scratch(secret_dir):
        assert "SECRET-7f3a9c" in run_python(code), "the secret should be readable when not hidden"
    with pytest.raises(SandboxError) as failure:  # SandboxFailed, or a refusal to start at all
        run_python(code, hidden_paths=[str(secret_dir)])
    assert "SECRET-7f3a9c" not in str(failure.value)
    listing = f"import os; print(os.listdir({str(secret_dir)!r}))"
    try:
        assert "keys.db" not in run_python(listing, hidden_paths=[str(secret_dir)])
    except SandboxError as e:
        assert "SECRET-7f3a9c" not in str(e)


def test_python_cannot_read_hidden_file_under_tmp(tmp_path):
    keys = tmp_path / "keys.db"
    keys.write_text("SECRET-b81d")
    with pytest.raises(SandboxError) as failure:
        run_python(f"print(open({str(keys)!r}).read())", hidden_paths=[str(tmp_path)])
    assert "SECRET-b81d" not in str(failure.value)


def test_python_has_no_network():
    if sandbox_features()["network"] != "off":
        pytest.skip("this OS refuses a network namespace")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    with server:
        with pytest.raises(SandboxFailed, match="OSError|ConnectionRefused|unreachable"):
            run_python(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)")
        with pytest.raises(socket.timeout):
            server.accept()


def test_python_runs_unprivileged_in_a_temp_dir_that_is_removed():
    features = sandbox_features()
    pattern = os.path.join(tempfile.gettempdir(), "llmos-sandbox-*")
    before = set(glob.glob(pattern))
    out = run_python("import os; open('left-behind.txt', 'w').write('x'); print(os.getuid(), os.getcwd())")
    uid, cwd = out.split()
    assert int(uid) == features["uid"]
    if os.geteuid() == 0:
        assert int(uid) != 0
    assert set(glob.glob(pattern)) == before
    assert not os.path.exists(os.path.join(cwd, "left-behind.txt"))


def test_python_cannot_write_outside_its_scratch():
    if sandbox_features()["filesystem"] != "read-only":
        pytest.skip("this OS refuses a read-only mount namespace")
    target = Path(__file__).parent / "sandbox-was-here.txt"
    refused = "Read-only file system|Permission denied" + ("|No such file or directory" if _under_scratch(target) else "")
    with pytest.raises(SandboxFailed, match=refused):
        run_python(f"open({str(target)!r}, 'w').write('x')")
    assert not target.exists()


def test_sandbox_features_report_what_was_applied():
    features = sandbox_features()
    assert features["network"] in ("on", "off")
    assert features["hidden_paths"] in ("tmpfs", "permissions", "none")
    assert set(features["rlimits"]) >= {"CPU", "AS", "FSIZE", "NOFILE", "NPROC"}


def test_python_arguments_are_validated():
    with pytest.raises(InvalidRequestError, match="timeout"):
        run_python("print(1)", timeout=0)
    with pytest.raises(InvalidRequestError, match="code"):
        run_python(b"print(1)")
    assert issubclass(SandboxLimit, SandboxError) and issubclass(SandboxTimeout, SandboxError)
