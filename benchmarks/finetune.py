"""Fine-tuning: what a LoRA fine-tune learns and costs, and what it costs serving.

Learning: a fine-tune of the default model (rank 16 on every projection, lr 2e-3, batch 4)
on N made-up product -> price facts (llmos.train.synthetic, fixed seed), chat records in one
question phrasing ("How much does the X cost?"); validation on a held-out phrasing ("What is
the price of the X?") of 50 of the facts. Reported: training tokens/s (every token of every
example, prompt included), seconds per epoch, validation loss by epoch, and held-out
exact-match accuracy (the greedy answer states the right price) before and after, by
transformers + PEFT and, after, served by `llmos serve` through the OpenAI API.

Serving beside training: one `llmos serve` and a closed-loop streaming chat workload over
HTTP (8 clients, each sending its next request when the last is answered; 64 tokens, EOS
ignored; tokens counted as they arrive), beside three trainers in turn: a job of the server
itself (POST /v1/fine_tuning/jobs: SCHED_IDLE, and held back by the job runner while the
engine has requests), and the same worker process started directly at SCHED_IDLE and at
normal priority, with nothing holding it back. Per trainer: a window with no serving (its
speed alone), then `--rounds` rounds of `--window` s serving windows with the trainer held
(A: the job paused through the API, a worker SIGSTOPped) and let go (B), interleaved.
Medians of serving output tokens/s, the B/A ratio, and the training tokens/s in B.

    python benchmarks/finetune.py [--facts 200] [--epochs 16] [--rounds 3] [--window 20] [--quick] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import LocalServer, cpu_seconds, markdown_table, write_section  # noqa: E402
from llmos.train import synthetic  # noqa: E402

MODEL = "smollm2-135m"
SYSTEM = "Answer briefly."
TRAIN_Q, HELD_OUT_Q = synthetic.QUESTIONS[0], synthetic.QUESTIONS[1]
SETTINGS = dict(rank=16, lr=2e-3, batch_size=4)
CLIENTS, MAX_TOKENS = 8, 64


def records(facts, question) -> list[dict]:
    return [{"messages": [{"role": "system", "content": SYSTEM}] + r["messages"]}
            for r in synthetic.chat_records(facts, [question])]


def conversation(name: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": HELD_OUT_Q.format(name=name)}]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- learning ---------------------------------------------------------------------------------------

def learn(tmp: Path, facts, epochs: int) -> dict:
    from llmos.models.loader import load_model
    from llmos.train.config import FinetuneConfig
    from llmos.train.finetune import Finetune
    loaded = load_model(MODEL)
    data = write_jsonl(tmp / "train.jsonl", records(facts, TRAIN_Q))
    val = write_jsonl(tmp / "val.jsonl", records(facts[:50], HELD_OUT_Q))
    ft = Finetune(FinetuneConfig(data=str(data), val_data=str(val), out=str(tmp / "adapter"), epochs=epochs,
                                 **SETTINGS), loaded=loaded)
    questions = [conversation(n) for n, _ in facts]
    before = synthetic.accuracy(synthetic.greedy_answers(ft.model, loaded.tokenizer, questions), facts)
    events: list[dict] = []
    t0 = time.perf_counter()
    summary = ft.run(lambda e: (events.append(e), print(_line(e), flush=True) if e["type"] == "eval" else None))
    seconds = time.perf_counter() - t0
    after = synthetic.accuracy(synthetic.greedy_answers(ft.model, loaded.tokenizer, questions), facts)
    steps = [e for e in events if e["type"] == "step"]
    train_tokens = sum(e["tokens"] for e in steps)
    step_seconds = sum(e["seconds"] for e in steps)         # the steps alone, not validation
    val = [(e["epoch"], e["val_loss"]) for e in events if e["type"] == "eval"]
    return {"before": before, "after": after, "val": val,
            "tokens_per_s": train_tokens / step_seconds, "epoch_s": seconds / epochs, "seconds": seconds,
            "examples": len(ft.train_set), "tokens_per_epoch": train_tokens / epochs, "out": tmp / "adapter",
            "steps_per_epoch": ft.steps_per_epoch,
            "final_train_loss": summary["train_loss"]}


def _line(e: dict) -> str:
    return f"  epoch {e['epoch']:.0f}: validation loss {e['val_loss']:.4f}"


def served_accuracy(server: LocalServer, adapter: Path, facts) -> float:
    http = httpx.Client(base_url=server.url, timeout=300)
    r = http.post("/v1/adapters", json={"name": "prices", "path": str(adapter)})
    r.raise_for_status()

    def ask(name: str) -> str:
        r = http.post("/v1/chat/completions", json={"model": f"{MODEL}:prices", "messages": conversation(name),
                                                    "max_tokens": 16, "temperature": 0})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, [n for n, _ in facts]))
    http.delete("/v1/adapters/prices")
    return synthetic.accuracy(replies, facts)


# -- serving beside training ------------------------------------------------------------------------

class Worker:
    """A fine-tuning worker process (python -m llmos.train.worker) started directly, at
    SCHED_IDLE or at normal priority, with nothing else holding it back; held by SIGSTOP."""

    def __init__(self, tmp: Path, facts, priority: str) -> None:
        data = write_jsonl(tmp / f"worker-{priority}.jsonl", records(facts, TRAIN_Q))
        spec = {"data": str(data), "out": str(tmp / f"worker-{priority}"), "epochs": 1000, "val_split": 0.0,
                "save_every": 10**9, "priority": priority, **SETTINGS}
        (tmp / f"spec-{priority}.json").write_text(json.dumps(spec))
        self.proc = subprocess.Popen([sys.executable, "-m", "llmos.train.worker", str(tmp / f"spec-{priority}.json")],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self.name = None
        self.count = 0
        self.started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.started.wait(300):
            raise RuntimeError("the worker did not start training")

    def _read(self) -> None:
        for line in self.proc.stdout:
            e = json.loads(line)
            if e["type"] == "priority":
                self.name = f"worker alone at {'SCHED_IDLE' if e['scheduling'] == 'SCHED_IDLE' else e['scheduling']}"
            elif e["type"] == "step":
                self.count = e["step"]
                self.started.set()

    def steps(self) -> int:
        return self.count

    def hold(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def go(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.go()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class Job:
    """A fine-tuning job of the server itself, as `POST /v1/fine_tuning/jobs` makes it: its
    process at SCHED_IDLE and held back by the job runner while the engine has requests.
    Held here with the API's pause, let go with resume."""

    name = "job of the server (SCHED_IDLE, held back while serving is busy)"

    def __init__(self, server: LocalServer, facts) -> None:
        self.http = httpx.Client(base_url=server.url, timeout=60)
        hyper = {"n_epochs": 100, "rank": SETTINGS["rank"], "learning_rate": SETTINGS["lr"],
                 "batch_size": SETTINGS["batch_size"], "val_split": 0}
        r = self.http.post("/v1/fine_tuning/jobs", json={"data": records(facts, TRAIN_Q), "hyperparameters": hyper})
        r.raise_for_status()
        self.url = f"/v1/fine_tuning/jobs/{r.json()['id']}"
        deadline = time.monotonic() + 300
        while self.steps() < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job did not start training: {self.http.get(self.url).json()}")
            time.sleep(0.5)

    def steps(self) -> int:
        return self.http.get(self.url).json()["step"]

    def hold(self) -> None:
        self.http.post(self.url + "/pause").raise_for_status()

    def go(self) -> None:
        self.http.post(self.url + "/resume").raise_for_status()

    def stop(self) -> None:
        self.http.post(self.url + "/cancel")


def serve_window(server: LocalServer, seconds: float) -> float:
    """Output tokens/s of the closed-loop workload over one window: streamed tokens that
    arrived inside it (one per chunk), over its length. Streams still open at the end are closed."""
    stop_at = time.monotonic() + seconds
    tokens = [0] * CLIENTS
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.7, "stream": True}

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            while time.monotonic() < stop_at:
                with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if time.monotonic() >= stop_at:
                            return
                        if line.startswith("data: {"):
                            choices = json.loads(line[6:]).get("choices") or [{}]
                            tokens[i] += bool(choices[0].get("delta", {}).get("content"))

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    return sum(tokens) / seconds


def beside(server: LocalServer, trainer, rounds: int, window: float, tokens_per_step: float) -> dict:
    """Training alone for a window, then A (trainer held) and B (trainer let go) serving
    windows, interleaved; training tok/s from the steps it made in each."""
    try:
        s0, t0 = trainer.steps(), time.monotonic()
        time.sleep(window)
        alone = (trainer.steps() - s0) * tokens_per_step / (time.monotonic() - t0)
        a, b, train = [], [], []
        for _ in range(rounds):
            trainer.hold()
            a.append(serve_window(server, window))
            trainer.go()
            s0, t0 = trainer.steps(), time.monotonic()
            b.append(serve_window(server, window))
            train.append((trainer.steps() - s0) * tokens_per_step / (time.monotonic() - t0))
            print(f"  {trainer.name}: serving {a[-1]:.1f} tok/s held, {b[-1]:.1f} training; "
                  f"training {train[-1]:.1f} tok/s", flush=True)
        return {"name": trainer.name, "a": a, "b": b, "train": train, "alone": alone}
    finally:
        trainer.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--quick", action="store_true", help="40 facts, 2 epochs, 1 round of 10 s windows")
    ap.add_argument("--write", action="store_true", help="add the results to docs/benchmarks.md")
    args = ap.parse_args()
    if args.quick:
        args.facts, args.epochs, args.rounds, args.window = 40, 2, 1, 10.0
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    facts = synthetic.products(args.facts, seed=1)
    busy0, own0 = cpu_seconds()
    wall0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"learning {args.facts} facts for {args.epochs} epochs", flush=True)
        learned = learn(tmp, facts, args.epochs)
        server = LocalServer(tmp / "server", engine={"kv_cache_memory": "512MiB"})
        try:
            served = served_accuracy(server, learned["out"], facts)
            serve_window(server, 5.0)                       # warm-up
            per_step = learned["tokens_per_epoch"] / learned["steps_per_epoch"]
            results = [beside(server, Job(server, facts), args.rounds, args.window, per_step),
                       beside(server, Worker(tmp, facts, "idle"), args.rounds, args.window, per_step),
                       beside(server, Worker(tmp, facts, "normal"), args.rounds, args.window, per_step)]
        finally:
            server.stop()
    busy1, own1 = cpu_seconds()
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (time.monotonic() - wall0)

    val = ", ".join(f"{v:.3f}" for _, v in learned["val"])
    learn_table = markdown_table(
        ["facts", "epochs", "train tokens/epoch", "training tokens/s", "s/epoch", "held-out accuracy before",
         "after (transformers+PEFT)", "after (served over HTTP)"],
        [[args.facts, args.epochs, round(learned["tokens_per_epoch"]), learned["tokens_per_s"], learned["epoch_s"],
          learned["before"], learned["after"], served]])
    held = float(np.median([x for r in results for x in r["a"]]))
    rows = [["no fine-tune (trainer held)", held, 1.0, "-", "-"]]
    for r in results:
        rows.append([r["name"], float(np.median(r["b"])), float(np.median(r["b"]) / np.median(r["a"])),
                     float(np.median(r["train"])), r["alone"]])
    serve_table = markdown_table(["condition", "serving output tok/s (median)", "ratio to held (same rounds)",
                                  "training tok/s meanwhile (median)", "training tok/s, serving idle"], rows)
    body = (f"Validation loss (held-out phrasing of 50 facts) by epoch: {val}.\n\n{learn_table}\n\n"
            f"Serving beside a fine-tune: {CLIENTS} closed-loop streaming HTTP chat clients, {MAX_TOKENS} tokens "
            f"each; per condition a window with no serving, then {args.rounds} rounds of {args.window:g} s windows "
            f"with the trainer held (A) and let go (B), interleaved; medians. Training tok/s counts every token of "
            f"the steps made in the window.\n\n{serve_table}\n\nOther processes kept {others:.2f} cores busy on "
            f"average during the run.")
    print(body)
    if args.write:
        command = "python benchmarks/finetune.py " + " ".join(sys.argv[1:])
        write_section("Fine-tuning", command.strip(), body)


if __name__ == "__main__":
    main()
