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


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m llmos.agent.run FILE.py|module:function [ARGS...]", file=sys.stderr)
        return 2
    target, args = argv[0], argv[1:]
    try:
        if ":" in target and not os.path.exists(target):
            module, _, func = target.partition(":")
            os.environ.setdefault("LLMOS_AGENT_FILE", "")
            sys.argv = [target, *args]
            result = getattr(importlib.import_module(module), func)()
            return result if isinstance(result, int) else 0
        path = os.path.abspath(target)
        os.environ.setdefault("LLMOS_AGENT_FILE", path)
        sys.argv = [path, *args]
        sys.path.insert(0, os.path.dirname(path))
        runpy.run_path(path, run_name="__main__")
        return 0
    except SystemExit as e:
        code = e.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
