"""The `llmos` command as users run it: a real subprocess on the real model."""

from __future__ import annotations

import subprocess
import sys


def llmos(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmos.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_models_lists_the_default_model(default_model_path):
    r = llmos("models")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "gguf" in r.stdout


def test_generate_streams_a_completion(default_model_path):
    r = llmos("generate", "The capital of France is", "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_chat_answers_and_quits_on_empty_line(default_model_path):
    r = llmos("chat", "--max-tokens", "24", "--temperature", "0", stdin="What is the capital of France?\n\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_unknown_model_is_a_clear_error_not_a_traceback(default_model_path):
    r = llmos("generate", "hi", "--model", "no-such-model")
    assert r.returncode == 1
    assert "no-such-model" in r.stderr and "llmos pull" in r.stderr and "Traceback" not in r.stderr
