"""The launcher every agent process starts in: `python -m llmos.agent.run TARGET [ARGS...]`.

TARGET is a .py file, run as __main__ with its own directory first on sys.path, or
`package.module:function`, imported and called (an int it returns is the exit code). An
uncaught exception prints its traceback to stderr (the process log) and exits 1."""

from __future__ import annotations

import importlib
import os
import runpy
import sys
import traceback


def is_entry_point(target: str, base: str | None = None) -> bool:
    """Whether `target` names `module:function` rather than a file. A path holding a colon
    is still a file when one exists there (relative to `base`); the kernel decides the same way."""
    if ":" not in target:
        return False
    return not os.path.exists(os.path.join(base or os.getcwd(), target))


def resolve_program(target: str, base: str) -> str:
    """The program as the kernel wants it: an absolute file path (a relative one is taken
    from `base`), or `module:function` unchanged."""
    if is_entry_point(target, base):
        return target
    return os.path.normpath(os.path.join(base, os.path.expanduser(target)))


def _call_entry_point(target: str):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m llmos.agent.run FILE.py|module:function [ARGS...]", file=sys.stderr)
        return 2
    target, args = argv[0], argv[1:]
    # The supervisor reads stdout and stderr through a pipe into the process log; line
    # buffering makes `llmos logs -f` show each line when it is printed, not at exit.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    try:
        if is_entry_point(target):
            os.environ.setdefault("LLMOS_AGENT_FILE", "")
            sys.argv = [target, *args]
            result = _call_entry_point(target)
            return result if isinstance(result, int) else 0
        path = os.path.abspath(target)
        os.environ.setdefault("LLMOS_AGENT_FILE", path)   # spawn() resolves relative paths against it
        sys.argv = [path, *args]
        sys.path.insert(0, os.path.dirname(path))
        runpy.run_path(path, run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)   # sys.exit("message"): printed, status 1, as Python does
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
