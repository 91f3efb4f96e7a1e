"""/v1/fine_tuning/jobs: LoRA fine-tuning as kernel jobs, in OpenAI's shape. A job trains
on a JSONL file from the tenant's own files (`training_file`, put there with PUT /v1/fs/...)
or on records sent inline (`data`), in its own low-priority process that runs only while
serving is idle; when it succeeds the server loads the adapter for the tenant, served as
model "MODEL:SUFFIX". A key sees, pauses, resumes and cancels its tenant's jobs; an admin
key all of them."""

from __future__ import annotations

import json
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from llmos.errors import InvalidRequestError, LLMOSError
from llmos.kernel.jobs import LIVE, Job, JobRunner, JobTable, new_job_id
from llmos.server.auth import Principal, authenticate, get_state
from llmos.server.errors import APIError
from llmos.server.routers.common import errors
from llmos.server.state import ServerState
from llmos.train.config import LORA_TARGETS, FinetuneConfig
from llmos.train.dataset import build_examples, check_record, parse_jsonl

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])

KIND = "fine_tune"
MAX_RECORDS = 100_000
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Status = Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    rank: int = Field(8, ge=1, le=256, description="LoRA rank; no more than the server's max_lora_rank")
    alpha: float | None = Field(None, gt=0, le=1e4, description="LoRA alpha; default 2 x rank")
    batch_size: int = Field(8, ge=1, le=256)
    val_split: float = Field(0.1, ge=0, le=0.5, description="fraction of the examples held out for validation")
    max_len: int = Field(512, ge=8, le=32768, description="tokens per example at most")
    truncate: bool = Field(False, description="cut longer examples to max_len instead of refusing the file")
    target_modules: list[str] | None = None


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="the base model; only the one this server serves")
    training_file: str | None = Field(None, description="path of a JSONL file in the tenant's files")
    data: list[Any] | None = Field(None, max_length=MAX_RECORDS, description="the training records inline")
    hyperparameters: Hyperparameters = Hyperparameters()
    suffix: str | None = Field(None, pattern=ADAPTER_NAME, description="the adapter's name; default: the job id")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class FineTuningJob(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    model: str
    status: Status
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    fine_tuned_model: str | None = Field(None, description="the model id that serves the adapter, once it does")
    hyperparameters: dict[str, Any]
    suffix: str
    seed: int
    tenant: str
    training_examples: int
    step: int
    total_steps: int | None
    progress: float = Field(description="0 to 1")
    metrics: dict[str, float] = Field(description="the latest train_loss, val_loss, tokens_per_s, and "
                                                  "yielded_s: seconds the job was held back for serving")
    error: dict[str, str] | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool = False
    counts: dict[str, int] = Field(description="the caller's jobs by status")


class FineTuningEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: float
    level: str
    message: str
    data: dict[str, Any] | None = None


class FineTuningEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningEvent]
    has_more: bool


def start(app: FastAPI, state: ServerState) -> JobRunner:
    """The job table under the agents home and its runner; a job that succeeds is loaded as
    an adapter its tenant may use, where the server serves adapters. A running job is held
    back while the engine has requests (where the engine can say so)."""
    home = state.settings.server.agents_path
    busy = getattr(getattr(state.llm, "engine", None), "has_unfinished", None)

    def install(job: Job) -> dict | None:
        llm = state.llm
        if not hasattr(llm, "load_adapter"):
            return None
        out = job.spec["out"]
        if llm.adapter(job.name) is not None:        # a retrained adapter of the same name replaces it
            llm.unload_adapter(job.name)
        llm.load_adapter(job.name, out, tenants=[job.tenant])
        return {"fine_tuned_model": f"{state.model_name}:{job.name}", "adapter": job.name, "path": out}

    runner = JobRunner(JobTable(home / "jobs.db"), home / "jobs", on_success=install, busy=busy)
    app.state.jobs = runner
    return runner


def _runner(request: Request) -> JobRunner:
    return request.app.state.jobs


def _body(state: ServerState, job: Job) -> FineTuningJob:
    s = job.spec
    return FineTuningJob(
        id=job.id, model=state.model_name, status=job.state, created_at=int(job.created_at),
        started_at=int(job.started_at) if job.started_at else None,
        finished_at=int(job.finished_at) if job.finished_at else None,
        fine_tuned_model=(job.result or {}).get("fine_tuned_model"),
        hyperparameters={"n_epochs": s["epochs"], "learning_rate": s["lr"], "rank": s["rank"], "alpha": s["alpha"],
                         "batch_size": s["batch_size"], "val_split": s["val_split"], "max_len": s["max_len"]},
        suffix=job.name, seed=s["seed"], tenant=job.tenant, training_examples=s.get("examples", 0), step=job.step,
        total_steps=job.total_steps, progress=job.progress,
        metrics={k: v for k, v in job.metrics.items() if isinstance(v, (int, float))},
        error={"message": job.error} if job.error else None)


def _read_training_file(state: ServerState, principal: Principal, path: str) -> bytes:
    try:
        return state.agents.storage.read(principal.tenant, path)
    except LLMOSError as e:
        if type(e).__name__ == "NotFound":
            raise APIError(400, f"training_file: no file {path!r} in your files (upload it with PUT /v1/fs/PATH)",
                           param="training_file", code="invalid_value") from None
        raise APIError(400, f"training_file: {e}", param="training_file", code="invalid_value") from None


def _prepare(state: ServerState, body: CreateJob, raw: bytes | None) -> list[dict]:
    """The checked records, or a 400 naming the line and the reason."""
    if raw is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise InvalidRequestError(f"training_file line {line}: not UTF-8 text") from None
        records = parse_jsonl(text, "training_file")
    else:
        if not body.data:
            raise InvalidRequestError("data: no records")
        records = list(enumerate(body.data, 1))
    name = (lambda n: f"training_file line {n}") if raw is not None else (lambda n: f"data[{n - 1}]")
    numbered = [(n, check_record(r, name(n))) for n, r in records]
    h = body.hyperparameters
    build_examples(numbered, state.llm.get_tokenizer(), h.max_len, truncate=h.truncate, name=name)
    return [r for _, r in numbered]


@router.post("/jobs", response_model=FineTuningJob, status_code=201, responses=errors(400, 401, 404, 409))
async def create(body: CreateJob, request: Request, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)):
    """Queue a LoRA fine-tune of the served model; it runs at low CPU priority beside serving."""
    if body.model is not None and body.model != state.model_name:
        raise APIError(404, f"model: {body.model!r} is not served here; fine-tune {state.model_name!r}",
                       param="model", code="model_not_found")
    if (body.training_file is None) == (body.data is None):
        raise APIError(400, "training_file: give exactly one of training_file (a JSONL file in your files) "
                            "or data (the records inline)", param="training_file", code="invalid_value")
    h = body.hyperparameters
    limit = getattr(state.llm.config, "max_lora_rank", None)
    if limit is not None and h.rank > limit:
        raise APIError(400, f"hyperparameters.rank: {h.rank} is more than this server serves (max_lora_rank "
                            f"{limit})", param="hyperparameters.rank", code="invalid_value")
    runner = _runner(request)
    job_id = new_job_id()
    name = body.suffix or job_id
    adapter = state.llm.adapter(name) if hasattr(state.llm, "adapter") else None
    if adapter is not None and not principal.admin and adapter.tenants != [principal.tenant]:
        raise APIError(409, f"suffix: adapter {name!r} is taken", param="suffix", code="adapter_exists")
    if any(j.name == name for st in LIVE for j in runner.table.list(state=st)):
        raise APIError(409, f"suffix: an unfinished job already trains {name!r}", param="suffix",
                       code="adapter_exists")
    raw = None
    if body.training_file is not None:
        raw = await anyio.to_thread.run_sync(_read_training_file, state, principal, body.training_file)
    records = await anyio.to_thread.run_sync(_prepare, state, body, raw)
    where = runner.job_dir(job_id)
    spec = {"data": str(where / "train.jsonl"), "out": str(where / "adapter"), "model": state.llm.config.model,
            "rank": h.rank, "alpha": h.alpha, "epochs": h.n_epochs, "lr": h.learning_rate, "batch_size": h.batch_size,
            "val_split": h.val_split, "max_len": h.max_len, "truncate": h.truncate, "seed": body.seed,
            "target_modules": h.target_modules or list(LORA_TARGETS)}

    def write() -> Job:
        FinetuneConfig(**spec).check()
        where.mkdir(parents=True, exist_ok=True)
        with open(where / "train.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        return runner.submit(principal.tenant, KIND, {**spec, "examples": len(records)}, name, job_id)

    job = await anyio.to_thread.run_sync(write)
    return _body(state, job)


@router.get("/jobs", response_model=FineTuningJobList, responses=errors(400, 401))
async def list_jobs(request: Request, limit: int = Query(20, ge=1, le=1000),
                    status: Status | None = None,
                    principal: Principal = Depends(authenticate), state: ServerState = Depends(get_state)):
    """Newest first; `counts` has the caller's jobs by status (an admin's: everyone's)."""
    table = _runner(request).table
    tenant = None if principal.admin else principal.tenant
    rows = await anyio.to_thread.run_sync(lambda: table.list(tenant, status, limit + 1))
    return FineTuningJobList(data=[_body(state, j) for j in rows[:limit]], has_more=len(rows) > limit,
                             counts=table.counts(tenant))


def _visible(request: Request, principal: Principal, job_id: str) -> Job:
    return _runner(request).table.get(job_id, None if principal.admin else principal.tenant)


@router.get("/jobs/{job_id}", response_model=FineTuningJob, responses=errors(400, 401, 404))
async def get_job(job_id: str, request: Request, principal: Principal = Depends(authenticate),
                  state: ServerState = Depends(get_state)):
    return _body(state, _visible(request, principal, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJob, responses=errors(400, 401, 404, 409))
async def cancel(job_id: str, request: Request, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)):
    """Cancel a queued job, or stop a running one (its process is killed; checkpoints stay)."""
    job = _visible(request, principal, job_id)
    job = await anyio.to_thread.run_sync(_runner(request).cancel, job.id)
    return _body(state, job)


@router.post("/jobs/{job_id}/pause", response_model=FineTuningJob, responses=errors(400, 401, 404, 409))
async def pause(job_id: str, request: Request, principal: Principal = Depends(authenticate),
                state: ServerState = Depends(get_state)):
    """Stop a running job where it is (its process kept, not training) until resumed."""
    job = _visible(request, principal, job_id)
    return _body(state, await anyio.to_thread.run_sync(_runner(request).pause, job.id))


@router.post("/jobs/{job_id}/resume", response_model=FineTuningJob, responses=errors(400, 401, 404, 409))
async def resume(job_id: str, request: Request, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)):
    job = _visible(request, principal, job_id)
    return _body(state, await anyio.to_thread.run_sync(_runner(request).resume, job.id))


@router.get("/jobs/{job_id}/events", response_model=FineTuningEventList, responses=errors(400, 401, 404))
async def events(job_id: str, request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=1000),
                 principal: Principal = Depends(authenticate)):
    """The job's log, newest first; `after` (an event id) gives only newer ones."""
    job = _visible(request, principal, job_id)
    since = 0
    if after is not None:
        try:
            since = int(after.removeprefix("ftevent-"))
        except ValueError:
            raise APIError(400, f"after: not an event id: {after!r}", param="after", code="invalid_value") from None
    table = _runner(request).table
    rows = await anyio.to_thread.run_sync(lambda: table.events(job.id, since, limit=1_000_000))
    newest = rows[::-1][:limit]
    return FineTuningEventList(data=[FineTuningEvent(id=f"ftevent-{e.id}", created_at=e.created_at, level=e.level,
                                                     message=e.message, data=e.data) for e in newest],
                               has_more=len(rows) > limit)
