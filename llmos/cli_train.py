"""`llmos finetune`: train a LoRA adapter on the base model from a JSONL file, here in the
foreground with a progress bar, or (`--submit`) as a job of a running server, which trains
it at low CPU priority beside serving and then serves it as MODEL:SUFFIX.
`llmos jobs` lists a server's fine-tuning jobs; `llmos jobs pause|resume|cancel ID` steers one."""

from __future__ import annotations

import argparse
import json
import sys
import time

from llmos.errors import InvalidRequestError, LLMOSError

USAGE_ERROR = 2


def cmd_finetune(args) -> int:
    try:
        return _submit(args) if args.submit else _train(args)
    except InvalidRequestError as e:
        print(f"llmos: error: {e}", file=sys.stderr)
        return USAGE_ERROR


def _config(args):
    from llmos.train.config import FinetuneConfig
    resume = args.resume if args.resume not in (None, "latest") else args.resume == "latest"
    return FinetuneConfig(
        data=args.data, out=args.out, model=args.model, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()], epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, val_split=args.val_split, val_data=args.val_data, max_len=args.max_len,
        truncate=args.truncate, seed=args.seed, warmup=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every, threads=args.threads,
        resume=resume).check()


def _train(args) -> int:
    if not args.out:
        raise InvalidRequestError("out: --out DIR is needed (where the adapter is written)")
    config = _config(args)
    from tqdm import tqdm
    from llmos.train.finetune import Finetune
    ft = Finetune(config)
    bar = tqdm(total=ft.total_steps, unit="step", dynamic_ncols=True, disable=args.quiet)
    shown: dict = {}

    def on_event(e: dict) -> None:
        kind = e["type"]
        if kind == "start":
            bar.n = e["step"]
            bar.refresh()
            bar.write(f"training {e['train_examples']} examples ({e['val_examples']} held out) for "
                      f"{config.epochs} epoch(s), {e['total_steps']} steps, {e['trainable_params']:,} LoRA "
                      f"parameters" + (f"; {e['truncated']} example(s) cut to --max-len" if e["truncated"] else ""))
        elif kind == "resume":
            bar.write(f"resumed from {e['path']} at step {e['step']}")
        elif kind == "step":
            bar.update(1)
            shown.update(loss=f"{e['train_loss']:.3f}", lr=f"{e['lr']:.2e}")
            if e.get("tokens_per_s"):
                shown["tok/s"] = f"{e['tokens_per_s']:.0f}"
            bar.set_postfix(shown, refresh=False)
        elif kind == "eval":
            shown["val"] = f"{e['val_loss']:.3f}"
            bar.set_postfix(shown)
            bar.write(f"step {e['step']}: validation loss {e['val_loss']:.4f}")

    summary = ft.run(on_event)
    bar.close()
    val = f", validation loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
    print(f"adapter written to {config.out} ({summary['step']} steps, {summary['seconds']:.0f} s{val}); "
          f"metrics in {config.out}/metrics.jsonl")
    return 0


def _submit(args) -> int:
    from llmos.cli_agents import Server
    from llmos.train.dataset import check_record, read_jsonl
    records = [check_record(r, f"{args.data} line {n}") for n, r in read_jsonl(args.data)]
    hyper = {"n_epochs": args.epochs, "learning_rate": args.lr, "rank": args.rank, "batch_size": args.batch_size,
             "val_split": args.val_split, "max_len": args.max_len}
    if args.alpha is not None:
        hyper["alpha"] = args.alpha
    body = {"data": records, "hyperparameters": hyper, "seed": args.seed}
    if args.suffix:
        body["suffix"] = args.suffix
    s = Server(args.url)
    job = s.request("POST", "/v1/fine_tuning/jobs", json=body).json()
    print(job["id"], flush=True)
    if not args.wait:
        return 0
    from tqdm import tqdm
    bar = tqdm(total=job.get("total_steps") or 1, unit="step", dynamic_ncols=True, disable=args.quiet)
    while job["status"] not in ("succeeded", "failed", "cancelled"):   # a paused job is waited for too
        time.sleep(1.0)
        job = s.request("GET", f"/v1/fine_tuning/jobs/{job['id']}").json()
        bar.total = job.get("total_steps") or bar.total
        bar.n = job.get("step", 0)
        metrics = job.get("metrics") or {}
        bar.set_postfix({k: f"{metrics[k]:.3f}" for k in ("train_loss", "val_loss") if k in metrics})
    bar.close()
    if job["status"] != "succeeded":
        print(f"llmos: error: job {job['id']} {job['status']}: {(job.get('error') or {}).get('message', '')}",
              file=sys.stderr)
        return 1
    served = f"; serving as {job['fine_tuned_model']}" if job.get("fine_tuned_model") else ""
    print(f"{job['id']}: succeeded{served}")
    return 0


def cmd_jobs(args) -> int:
    from llmos.cli_agents import Server
    s = Server(args.url)
    if args.action in ("cancel", "pause", "resume"):
        if not args.id:
            raise LLMOSError(f"id: `llmos jobs {args.action}` needs a job id")
        job = s.request("POST", f"/v1/fine_tuning/jobs/{args.id}/{args.action}").json()
        print(f"{job['id']}: {job['status']}")
        return 0
    if args.action == "events":
        if not args.id:
            raise LLMOSError("id: `llmos jobs events` needs a job id")
        rows = s.request("GET", f"/v1/fine_tuning/jobs/{args.id}/events", params={"limit": 1000}).json()["data"]
        for e in reversed(rows):
            print(f"{time.strftime('%H:%M:%S', time.localtime(e['created_at']))} {e['level']:<5} {e['message']}")
        return 0
    rows = s.request("GET", "/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'ID':<23} {'TENANT':<12} {'STATUS':<10} {'PROGRESS':>8} {'TRAIN':>7} {'VAL':>7}  MODEL")
    for j in rows:
        m = j.get("metrics") or {}
        fmt = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
        print(f"{j['id']:<23} {j['tenant'][:12]:<12} {j['status']:<10} {j['progress'] * 100:>7.0f}% "
              f"{fmt(m.get('train_loss')):>7} {fmt(m.get('val_loss')):>7}  {j.get('fine_tuned_model') or '-'}")
    return 0


def _server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="the llmos server (default $LLMOS_URL or http://127.0.0.1:8000)")


def add_commands(sub) -> None:
    from llmos.config import EngineConfig
    from llmos.train.config import LORA_TARGETS, SCHEDULES
    p = sub.add_parser("finetune", help="train a LoRA adapter from a JSONL file (chat or prompt/completion records)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="JSONL: {\"messages\": [...]} or {\"prompt\", \"completion\"} a line")
    p.add_argument("--out", default=None, help="directory for the adapter, checkpoints and metrics.jsonl")
    p.add_argument("--model", default=EngineConfig.model, help="base model: store name, .gguf or HF directory")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (1-256)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (scale = alpha / rank); default 2 x rank")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--target-modules", default=",".join(LORA_TARGETS), help="comma-separated projections to adapt")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--val-split", type=float, default=0.1, help="fraction of the examples held out for validation")
    p.add_argument("--val-data", default=None, help="JSONL of validation records (instead of --val-split)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example at most")
    p.add_argument("--truncate", action="store_true", help="cut longer examples to --max-len instead of refusing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps warming up the learning rate")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints; 0 = each epoch")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0, help="steps between validations; 0 = each epoch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in OUT, or from the one given")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--submit", action="store_true", help="run it as a job of the server at --url instead")
    p.add_argument("--suffix", default=None, help="--submit: the adapter's name; served as MODEL:SUFFIX")
    p.add_argument("--wait", action="store_true", help="--submit: follow the job until it ends")
    _server_arg(p)
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("jobs", help="a server's fine-tuning jobs: list | events ID | pause ID | resume ID | cancel ID")
    p.add_argument("action", nargs="?", choices=["list", "events", "pause", "resume", "cancel"], default="list")
    p.add_argument("id", nargs="?", default=None)
    p.add_argument("--json", action="store_true")
    _server_arg(p)
    p.set_defaults(func=cmd_jobs)
