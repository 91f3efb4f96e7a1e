"""Jobs: long batch work the kernel runs beside serving (today: LoRA fine-tuning).

A job is a row in SQLite before it runs, so it outlives the kernel, and it runs as its own
OS process at the lowest CPU priority (SCHED_IDLE, else nice 19; the worker sets it on itself
before its compute threads exist). On a small machine that is not enough: serving leaves
short gaps (HTTP, Python, threads waking) that the trainer fills, and the two then share
caches, memory bandwidth and hyperthread siblings, which costs serving about a fifth of its
throughput at either priority (benchmarks/finetune.py). So the runner also keeps the job's
process stopped (SIGSTOP) while serving has requests, and lets it go (SIGCONT) once serving
has been idle for a moment: training runs in serving's idle time. One job runs at a time;
the others wait queued.

States: queued -> running <-> paused -> succeeded | failed | cancelled; a person pauses and
resumes a running job (its process stopped, its memory kept). The worker reports progress as
JSON lines on its stdout ({"type": "step" | "eval" | "checkpoint" | "done" | "error", ...});
the runner records them as the job's progress, latest metrics and event log. A job the
kernel was running when it stopped goes back to the queue and resumes from its last
checkpoint when the kernel starts again.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmos.errors import InvalidRequestError

STATES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")
LIVE = ("queued", "running", "paused")
FINAL = ("succeeded", "failed", "cancelled")
WORKER = "llmos.train.worker"       # the module a fine-tuning job's process runs
STEP_EVENT_INTERVAL = 5.0          # seconds between step events kept in the log (all update progress)


class NoSuchJob(InvalidRequestError):
    """No job with that id (for this tenant)."""

    kind = "NotFound"


class JobFinished(InvalidRequestError):
    """The job has ended already (or is not in the state the action needs)."""

    kind = "AlreadyDecided"


@dataclass
class Job:
    id: str
    tenant: str
    kind: str
    state: str
    spec: dict                      # what the worker runs (for fine-tuning: FinetuneConfig's fields)
    name: str | None                # what the result is called (an adapter's name)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int | None = None
    metrics: dict = field(default_factory=dict)     # the latest train_loss, val_loss, tokens_per_s, ...
    error: str | None = None
    pid: int | None = None
    result: dict | None = None      # set by whoever installs the output (e.g. the adapter's model name)

    @property
    def progress(self) -> float:
        if self.state == "succeeded":
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "progress": self.progress}


@dataclass
class JobEvent:
    id: int
    job_id: str
    created_at: float
    level: str                      # info | warn | error
    message: str
    data: dict | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL,
    name TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL, step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER, metrics TEXT NOT NULL DEFAULT '{}', error TEXT, pid INTEGER, result TEXT);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at REAL NOT NULL, level TEXT NOT NULL,
    message TEXT NOT NULL, data TEXT);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, id);
"""
_COLS = ("id, tenant, kind, state, spec, name, created_at, started_at, finished_at, step, total_steps, metrics, "
         "error, pid, result")


class JobTable:
    """The durable table of jobs and their event logs."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, tenant: str, kind: str, spec: dict, name: str | None = None, job_id: str | None = None) -> Job:
        job = Job(job_id or new_job_id(), tenant, kind, "queued", spec, name, time.time())
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                             (job.id, tenant, kind, "queued", json.dumps(spec), name, job.created_at, None, None,
                              0, None, "{}", None, None, None))
        return job

    def get(self, job_id: str, tenant: str | None = None) -> Job:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or (tenant is not None and row[1] != tenant):
            raise NoSuchJob(f"job_id: no job {job_id!r}")
        return _job(row)

    def list(self, tenant: str | None = None, state: str | None = None, limit: int = 1000) -> list[Job]:
        """Newest first."""
        if state is not None and state not in STATES:
            raise InvalidRequestError(f"state: must be one of {', '.join(STATES)}, got {state!r}")
        q, args = f"SELECT {_COLS} FROM jobs WHERE 1=1", []
        if tenant is not None:
            q, args = q + " AND tenant=?", [*args, tenant]
        if state is not None:
            q, args = q + " AND state=?", [*args, state]
        with self._lock:
            rows = self._db.execute(q + " ORDER BY created_at DESC, rowid DESC LIMIT ?", [*args, limit]).fetchall()
        return [_job(r) for r in rows]

    def update(self, job_id: str, **fields) -> None:
        for k in ("spec", "metrics", "result"):
            if k in fields and fields[k] is not None:
                fields[k] = json.dumps(fields[k])
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in fields)} WHERE id=?",
                             (*fields.values(), job_id))

    def transition(self, job_id: str, from_states: tuple[str, ...], to: str, **fields) -> bool:
        """Move the job to `to` only if it is in one of `from_states` (one caller wins a race)."""
        for k in ("spec", "metrics", "result"):
            if k in fields and fields[k] is not None:
                fields[k] = json.dumps(fields[k])
        sets = ", ".join(["state=?"] + [f"{k}=?" for k in fields])
        marks = ",".join("?" * len(from_states))
        with self._lock:
            return self._db.execute(f"UPDATE jobs SET {sets} WHERE id=? AND state IN ({marks})",
                                    (to, *fields.values(), job_id, *from_states)).rowcount == 1

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO job_events (job_id, created_at, level, message, data) VALUES (?,?,?,?,?)",
                             (job_id, time.time(), level, message, json.dumps(data) if data is not None else None))

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        """Oldest first, those with id > `after`."""
        with self._lock:
            rows = self._db.execute("SELECT id, job_id, created_at, level, message, data FROM job_events "
                                    "WHERE job_id=? AND id>? ORDER BY id LIMIT ?", (job_id, after, limit)).fetchall()
        return [JobEvent(*r[:5], json.loads(r[5]) if r[5] else None) for r in rows]

    def counts(self, tenant: str | None = None) -> dict[str, int]:
        q, args = "SELECT state, COUNT(*) FROM jobs", []
        if tenant is not None:
            q, args = q + " WHERE tenant=?", [tenant]
        with self._lock:
            found = dict(self._db.execute(q + " GROUP BY state", args).fetchall())
        return {s: found.get(s, 0) for s in STATES}


class Gate:
    """Whether a job's process may run now: it is stopped while a person has paused it or
    while serving is busy, and counts how long it was kept stopped for serving."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.held = False                 # paused by a person
        self.stopped = False
        self.released = False             # ending: never stop it again
        self.yields = 0                   # times stopped for serving
        self.yielded_s = 0.0              # seconds stopped for serving
        self._since = 0.0
        self._lock = threading.Lock()

    def set(self, stop: bool) -> None:
        with self._lock:
            stop = stop and not self.released
            if stop == self.stopped or self.proc.poll() is not None:
                return
            try:
                os.killpg(self.proc.pid, signal.SIGSTOP if stop else signal.SIGCONT)
            except ProcessLookupError:
                return
            now = time.monotonic()
            if stop and not self.held:
                self.yields += 1
            elif not stop and self._since and not self.held:
                self.yielded_s += now - self._since
            self.stopped, self._since = stop, now

    def release(self) -> None:
        """Let it run for good (before it is stopped for good)."""
        self.released = True
        self.set(False)


class JobRunner:
    """Runs queued jobs one at a time, each as a low-priority OS process, and keeps the table
    current from what the process reports. `on_success(job)` runs when a job has succeeded
    (the server uses it to start serving the adapter) and returns what to store as its result."""

    def __init__(self, table: JobTable, home: Path, *, on_success: Callable[[Job], dict | None] | None = None,
                 busy: Callable[[], bool] | None = None, idle_before_resume: float = 0.2,
                 kill_grace: float = 5.0) -> None:
        """`busy()` says whether serving has requests now; while it does, the running job's
        process is kept stopped, and it runs again once serving has been idle for
        `idle_before_resume` seconds. None: the job runs whenever the CPU scheduler lets it."""
        self.table = table
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.on_success = on_success
        self.busy = busy
        self.idle_before_resume = idle_before_resume
        self.kill_grace = kill_grace
        self._wake = threading.Condition()
        self._running: dict[str, subprocess.Popen] = {}
        self._gates: dict[str, Gate] = {}
        self._cancelled: set[str] = set()
        self._stopping = False
        for job in table.list(state="running") + table.list(state="paused"):   # the kernel stopped while it ran
            table.transition(job.id, ("running", "paused"), "queued", pid=None)
            table.add_event(job.id, "the kernel restarted while this job ran; it resumes from its last checkpoint",
                            "warn")
        self._thread = threading.Thread(target=self._loop, name="llmos-jobs", daemon=True)
        self._thread.start()
        if busy is not None:
            threading.Thread(target=self._pace, name="llmos-jobs-pacer", daemon=True).start()

    def job_dir(self, job_id: str) -> Path:
        return self.home / job_id

    def submit(self, tenant: str, kind: str, spec: dict, name: str | None = None, job_id: str | None = None) -> Job:
        job = self.table.create(tenant, kind, spec, name, job_id)
        self.table.add_event(job.id, f"queued {kind} job" + (f" {name!r}" if name else ""))
        with self._wake:
            self._wake.notify_all()
        return self.table.get(job.id)

    def cancel(self, job_id: str, tenant: str | None = None) -> Job:
        """Cancel a queued job, or stop a running one (SIGTERM, then SIGKILL after the grace)."""
        job = self.table.get(job_id, tenant)
        if job.state in FINAL:
            raise JobFinished(f"job_id: job {job_id} has {job.state} already")
        with self._wake:
            self._cancelled.add(job_id)
            proc = self._running.get(job_id)
            gate = self._gates.get(job_id)
        if proc is None and self.table.transition(job_id, ("queued",), "cancelled", finished_at=time.time()):
            self.table.add_event(job_id, "cancelled before it started")
        elif proc is not None:
            if gate is not None:
                gate.release()
            _stop(proc, self.kill_grace)
        return self.table.get(job_id)

    def pause(self, job_id: str, tenant: str | None = None) -> Job:
        """Stop a running job's process where it is (its memory kept) until `resume`."""
        return self._hold(job_id, tenant, True)

    def resume(self, job_id: str, tenant: str | None = None) -> Job:
        return self._hold(job_id, tenant, False)

    def _hold(self, job_id: str, tenant: str | None, held: bool) -> Job:
        """A person's pause (held) or resume: the state change and the gate together."""
        self.table.get(job_id, tenant)
        before, after = ("running", "paused") if held else ("paused", "running")
        with self._wake:
            gate = self._gates.get(job_id)
            if gate is None or not self.table.transition(job_id, (before,), after):
                raise JobFinished(f"job_id: job {job_id} is not running; only a running job can be paused" if held
                                  else f"job_id: job {job_id} is not paused")
            gate.held = held
            gate.set(held)                    # resumed: the pacer stops it again at once if serving is busy
        self.table.add_event(job_id, "paused" if held else "resumed")
        return self.table.get(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.table.get(job_id)
            if job.state in FINAL or (deadline is not None and time.monotonic() > deadline):
                return job
            time.sleep(0.1)

    def shutdown(self) -> None:
        """Stop the running job; it stays `running` in the table and resumes at the next start."""
        with self._wake:
            self._stopping = True
            procs = list(self._running.values())
            gates = list(self._gates.values())
            self._wake.notify_all()
        for gate in gates:
            gate.release()
        for proc in procs:
            _stop(proc, self.kill_grace)
        self._thread.join(timeout=self.kill_grace + 5)
        self.table.close()

    # -- the runner thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                queued = self.table.list(state="queued")
                if not queued:
                    self._wake.wait(timeout=1.0)
                    continue
            job = queued[-1]                      # the oldest first
            try:
                self._run(job)
            except Exception as e:                # a job that cannot start fails; the runner goes on
                with self._wake:
                    self._running.pop(job.id, None)
                self.table.transition(job.id, ("queued", "running"), "failed", finished_at=time.time(), pid=None,
                                      error=f"could not run: {e}")
                self.table.add_event(job.id, f"failed: could not run: {e}", "error")

    def _run(self, job: Job) -> None:
        where = self.job_dir(job.id)
        where.mkdir(parents=True, exist_ok=True)
        (where / "spec.json").write_text(json.dumps(job.spec))
        with (where / "worker.log").open("ab") as log, self._wake:
            if self._stopping or job.id in self._cancelled:
                return
            proc = subprocess.Popen([sys.executable, "-m", WORKER, str(where / "spec.json")], stdout=subprocess.PIPE,
                                    stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self._running[job.id] = proc
            gate = self._gates[job.id] = Gate(proc)
        if not self.table.transition(job.id, ("queued",), "running", started_at=job.started_at or time.time(),
                                     pid=proc.pid, error=None):
            _stop(proc, self.kill_grace)          # cancelled in the moment between
        else:
            self.table.add_event(job.id, f"started process {proc.pid}")
        last = self._follow(job, proc, gate)
        code = proc.wait()
        with self._wake:
            self._running.pop(job.id, None)
            self._gates.pop(job.id, None)
            cancelled = job.id in self._cancelled
            stopping = self._stopping
        if gate.yields:
            self.table.add_event(job.id, f"gave the CPU to serving {gate.yields} time(s), "
                                 f"{gate.yielded_s:.1f} s in all", data={"yields": gate.yields,
                                                                          "yielded_s": gate.yielded_s})
        now = time.time()
        if cancelled:
            self.table.transition(job.id, LIVE, "cancelled", finished_at=now, pid=None)
            self.table.add_event(job.id, "cancelled; its process was stopped")
        elif stopping:
            self.table.add_event(job.id, "the kernel is stopping; the job resumes when it starts again", "warn")
        elif code == 0 and last.get("type") == "done" and last.get("finished"):
            result = None
            if self.on_success is not None:
                try:
                    result = self.on_success(self.table.get(job.id))
                except Exception as e:        # the adapter is on disk either way; say why it is not served
                    self.table.add_event(job.id, f"trained, but could not be installed: {e}", "warn")
            self.table.transition(job.id, LIVE, "succeeded", finished_at=now, pid=None, result=result)
            self.table.add_event(job.id, "succeeded", data=result)
        else:
            error = last.get("message") if last.get("type") == "error" else _tail(where / "worker.log") or \
                f"the worker exited with status {code}"
            self.table.transition(job.id, LIVE, "failed", finished_at=now, pid=None, error=error)
            self.table.add_event(job.id, f"failed: {error}", "error")

    def _pace(self) -> None:
        """Stop running jobs while serving is busy; let them go after it has been idle a while."""
        idle_since = time.monotonic()
        while not self._stopping:
            with self._wake:
                gates = list(self._gates.values())
            if not gates:                         # nothing to pace: look again later
                time.sleep(0.2)
                continue
            try:
                busy = bool(self.busy())
            except Exception:                     # a probe that fails must not stop the jobs for good
                busy = False
            now = time.monotonic()
            if busy:
                idle_since = now
            for gate in gates:
                gate.set(gate.held or now - idle_since < self.idle_before_resume)
            time.sleep(0.01 if busy else 0.02)

    def _follow(self, job: Job, proc: subprocess.Popen, gate: Gate) -> dict:
        """Record what the worker reports until it closes its stdout; returns its last event."""
        last: dict = {}
        logged = 0.0
        metrics: dict = {}
        for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue                          # not ours (a library printing to stdout)
            if not isinstance(event, dict):
                continue
            last = event
            kind = event.get("type")
            if kind == "start":
                self.table.update(job.id, total_steps=event.get("total_steps"), step=event.get("step", 0))
                self.table.add_event(job.id, f"training {event.get('train_examples')} examples "
                                     f"({event.get('val_examples')} held out), {event.get('total_steps')} steps"
                                     + (f" from step {event['step']}" if event.get("step") else ""), data=event)
            elif kind == "step":
                metrics.update({k: event[k] for k in ("train_loss", "lr", "tokens_per_s", "epoch") if k in event})
                metrics["yielded_s"] = round(gate.yielded_s, 3)
                self.table.update(job.id, step=event["step"], metrics=metrics)
                if time.monotonic() - logged >= STEP_EVENT_INTERVAL:
                    logged = time.monotonic()
                    self.table.add_event(job.id, f"step {event['step']}: train loss {event['train_loss']:.4f}",
                                         data=event)
            elif kind == "eval":
                metrics["val_loss"] = event["val_loss"]
                self.table.update(job.id, metrics=metrics)
                self.table.add_event(job.id, f"step {event['step']}: validation loss {event['val_loss']:.4f}",
                                     data=event)
            elif kind in ("checkpoint", "resume", "priority"):
                self.table.add_event(job.id, f"{kind}: " + ", ".join(f"{k}={v}" for k, v in event.items()
                                                                      if k != "type"), data=event)
            elif kind == "done":
                final = {k: event[k] for k in ("val_loss", "train_loss", "tokens_per_s", "seconds")
                         if event.get(k) is not None}
                self.table.update(job.id, step=event.get("step", 0), metrics={**metrics, **final})
        return last


def new_job_id() -> str:
    return "ftjob-" + uuid.uuid4().hex[:16]


def _job(row) -> Job:
    return Job(id=row[0], tenant=row[1], kind=row[2], state=row[3], spec=json.loads(row[4]), name=row[5],
               created_at=row[6], started_at=row[7], finished_at=row[8], step=row[9], total_steps=row[10],
               metrics=json.loads(row[11] or "{}"), error=row[12], pid=row[13],
               result=json.loads(row[14]) if row[14] else None)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the worker's process group, SIGKILL if it is still there after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
            os.killpg(proc.pid, signal.SIGCONT)   # a stopped process acts on SIGTERM only once continued
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_bytes()[-limit:].decode("utf-8", "replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""
