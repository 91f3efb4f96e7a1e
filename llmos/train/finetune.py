"""LoRA fine-tuning: a small training loop over PEFT's LoRA on transformers' Llama, which
`to_transformers` fills with exactly the weights llmos serves.

The loop is plain PyTorch: AdamW on the adapter's parameters only, gradient clipping, linear
warm-up then cosine (or linear, or constant) decay, padded batches, and a loss over the
assistant's tokens alone. The language-model head runs only at the positions the loss looks
at: most positions of a chat example are prompt, and the head (vocabulary x hidden) is a
fifth of the model's multiply-adds per token.

A checkpoint (OUT/checkpoints/step-K) holds the adapter, the optimizer and schedule, the RNG
and the position in the data; the order of each epoch is a function of the seed and the
epoch alone, so `resume` continues to the very weights an uninterrupted run reaches.
The result is PEFT's own format (adapter_config.json + adapter_model.safetensors), which
`PeftModel.from_pretrained` and llmos's adapter loader both read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from llmos.errors import InvalidRequestError
from llmos.train.config import FinetuneConfig
from llmos.train.dataset import (IGNORE, Batch, Example, build_examples, check_record, collate, epoch_order,
                                 read_jsonl, split)

# What a checkpoint must agree on to be resumed: everything that shapes the trajectory.
_TRAJECTORY = ("model", "rank", "alpha", "dropout", "target_modules", "epochs", "lr", "batch_size", "val_split",
               "max_len", "truncate", "seed", "warmup", "schedule", "weight_decay", "grad_clip")


Event = dict                                      # {"type": "step" | "eval" | "checkpoint" | "start" | "done", ...}


class Finetune:
    """One fine-tuning run: `Finetune(config).run(on_event)` trains and writes OUT."""

    def __init__(self, config: FinetuneConfig, *, examples: list[Example] | None = None,
                 val_examples: list[Example] | None = None, loaded=None) -> None:
        self.config = c = config.check()
        self.out = Path(c.out)
        _check_writable(self.out)
        if c.resume:
            self.checkpoint = _find_checkpoint(self.out, c.resume)
        # the records are checked before the model loads, so a bad file fails at once
        records = None if examples is not None else _checked(c.data)
        val_records = None if val_examples is not None or not c.val_data else _checked(c.val_data)
        if c.threads:
            torch.set_num_threads(c.threads)
        if loaded is None:
            from llmos.models.loader import load_model
            loaded = load_model(c.model)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        limit = loaded.config.max_position_embeddings
        if c.max_len > limit:
            raise InvalidRequestError(f"max_len: {c.max_len} is more than the model's context of {limit} tokens")
        if records is not None:
            examples = build_examples(records, self.tokenizer, c.max_len, truncate=c.truncate, source=str(c.data))
        if val_records is not None:
            val_examples = build_examples(val_records, self.tokenizer, c.max_len, truncate=c.truncate,
                                          source=str(c.val_data))
        self.fingerprint = _fingerprint(examples)
        if val_examples is None:
            self.train_set, self.val_set = split(examples, c.val_split, c.seed)
        else:
            self.train_set, self.val_set = list(examples), list(val_examples)
        self.steps_per_epoch = math.ceil(len(self.train_set) / c.batch_size)
        self.total_steps = self.steps_per_epoch * c.epochs
        self.model = self._build_model()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        warm = round(c.warmup * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _schedule(c.schedule, warm, self.total_steps))
        self.step = 0
        self.history: list[dict] = []             # every event written to metrics.jsonl, in order
        self.truncated = sum(e.truncated for e in examples)

    def _build_model(self):
        from peft import LoraConfig, get_peft_model
        from llmos.models.loader import to_transformers
        c = self.config
        base = to_transformers(self.loaded)
        base.config.name_or_path = self.loaded.name
        for p in base.parameters():
            p.requires_grad_(False)
        torch.manual_seed(c.seed)                 # LoRA's A matrices start random; B at zero
        with warnings.catch_warnings():           # peft asks transformers a deprecated question
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(base, LoraConfig(r=c.rank, lora_alpha=c.lora_alpha, lora_dropout=c.dropout,
                                                   target_modules=list(c.target_modules), bias="none",
                                                   task_type="CAUSAL_LM"))

    # -- the loss ---------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the batch's trained tokens, and how many there were."""
        llama = self.model.base_model.model        # LlamaForCausalLM with LoRA layers inside
        hidden = llama.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        where = batch.targets != IGNORE
        logits = llama.lm_head(hidden[:, :-1][where])
        n = int(where.sum())
        return torch.nn.functional.cross_entropy(logits.float(), batch.targets[where], reduction="sum") / max(n, 1), n

    @torch.no_grad()
    def evaluate(self, examples: list[Example] | None = None) -> float | None:
        """Mean loss per trained token over `examples` (the held-out split by default)."""
        examples = self.val_set if examples is None else examples
        if not examples:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(examples), self.config.batch_size):
            loss, n = self.loss(collate(examples[i:i + self.config.batch_size]))
            total, count = total + float(loss) * n, count + n
        self.model.train()
        return total / max(count, 1)

    # -- the loop -------------------------------------------------------------------------------
    def run(self, on_event: Callable[[Event], None] = lambda e: None, stop: Callable[[], bool] = lambda: False) -> dict:
        """Train to the end (or until `stop()` says so between steps); returns the summary."""
        c = self.config
        if c.resume:
            self._resume(on_event)
        else:
            self._clear_metrics()
        self._emit(on_event, {"type": "start", "step": self.step, "total_steps": self.total_steps,
                              "train_examples": len(self.train_set), "val_examples": len(self.val_set),
                              "truncated": self.truncated, "trainable_params": self._trainable()}, record=False)
        if self.step == 0 and self.val_set:
            self._emit(on_event, {"type": "eval", "step": 0, "epoch": 0, "val_loss": self.evaluate()})
        self.model.train()
        window = _Window()
        started = time.monotonic()
        while self.step < self.total_steps and not stop():
            epoch, k = divmod(self.step, self.steps_per_epoch)
            order = epoch_order(len(self.train_set), c.seed, epoch)
            batch = collate([self.train_set[i] for i in order[k * c.batch_size:(k + 1) * c.batch_size]])
            lr = self.scheduler.get_last_lr()[0]
            loss, seconds = self._step(batch)
            window.add(loss, batch.tokens, seconds)
            self._emit(on_event, {"type": "step", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                                  "train_loss": loss, "lr": lr, "tokens": batch.tokens, "seconds": seconds,
                                  "tokens_per_s": window.tokens_per_s, "elapsed": time.monotonic() - started})
            end_of_epoch = self.step % self.steps_per_epoch == 0
            if self.val_set and (self.step == self.total_steps or (
                    self.step % c.eval_every == 0 if c.eval_every else end_of_epoch)):
                self._emit(on_event, {"type": "eval", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                                      "val_loss": self.evaluate()})
            if self.step % c.save_every == 0 if c.save_every else end_of_epoch:
                self.save_checkpoint(on_event)
        finished = self.step >= self.total_steps
        if finished:
            self.model.save_pretrained(str(self.out))
        summary = {"type": "done", "finished": finished, "step": self.step, "total_steps": self.total_steps,
                   "out": str(self.out), "val_loss": self.last_val_loss(), "train_loss": window.mean_loss,
                   "tokens_per_s": window.tokens_per_s, "seconds": time.monotonic() - started}
        self._emit(on_event, summary, record=False)
        return summary

    def _step(self, batch: Batch) -> tuple[float, float]:
        """One optimizer step; the batch's loss and the seconds it took."""
        t0 = time.perf_counter()
        loss, _ = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item(), time.perf_counter() - t0

    def last_val_loss(self) -> float | None:
        return next((e["val_loss"] for e in reversed(self.history) if e.get("type") == "eval"), None)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, on_event: Callable[[Event], None] = lambda e: None) -> Path:
        root = self.out / "checkpoints"
        final = root / f"step-{self.step}"
        tmp = root / f".step-{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(str(tmp))
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": torch.get_rng_state(), "history": self.history, "config": self._trajectory(),
                 "fingerprint": self.fingerprint}
        torch.save(state, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(_checkpoints(root), key=lambda p: -_step_of(p))[self.config.keep_checkpoints:]:
            shutil.rmtree(old, ignore_errors=True)
        self._emit(on_event, {"type": "checkpoint", "step": self.step, "path": str(final)}, record=False)
        return final

    def _resume(self, on_event: Callable[[Event], None]) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        c = self.config
        path = self.checkpoint
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        if state["fingerprint"] != self.fingerprint:
            raise InvalidRequestError(f"resume: {path} was trained on other data than {c.data}")
        differ = [k for k, v in self._trajectory().items() if state["config"].get(k) != v]
        if differ:
            was = ", ".join(f"{k}={state['config'].get(k)!r}" for k in differ)
            raise InvalidRequestError(f"resume: {path} was made with {was}; resume with the same settings")
        set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step = state["step"]
        self.history = list(state["history"])
        self._clear_metrics()
        with open(self.out / "metrics.jsonl", "a") as f:
            for e in self.history:
                f.write(json.dumps(e) + "\n")
        on_event({"type": "resume", "step": self.step, "path": str(path)})

    # -- bookkeeping ------------------------------------------------------------------------------
    def _emit(self, on_event, event: Event, record: bool = True) -> None:
        if record:
            self.history.append(event)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(event) + "\n")
        on_event(event)

    def _clear_metrics(self) -> None:
        (self.out / "metrics.jsonl").write_text("")

    def _trajectory(self) -> dict:
        d = dataclasses.asdict(self.config)
        return {k: d[k] for k in _TRAJECTORY}

    def _trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


class _Window:
    """Running loss and throughput over the last few steps."""

    def __init__(self, size: int = 20) -> None:
        self.size, self.items = size, []

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.items = (self.items + [(loss, tokens, seconds)])[-self.size:]

    @property
    def tokens_per_s(self) -> float | None:
        s = sum(i[2] for i in self.items)
        return sum(i[1] for i in self.items) / s if s > 0 else None

    @property
    def mean_loss(self) -> float | None:
        return sum(i[0] for i in self.items) / len(self.items) if self.items else None


def _schedule(kind: str, warm: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        done = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * done)) if kind == "cosine" else max(0.0, 1 - done)
    return factor


def _fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()[:16]


def _find_checkpoint(out: Path, resume: bool | str) -> Path:
    """The checkpoint `resume` names: a path, or (True) the newest one in OUT."""
    if isinstance(resume, str):
        path = Path(resume)
    else:
        found = sorted(_checkpoints(out / "checkpoints"), key=_step_of)
        if not found:
            raise InvalidRequestError(f"resume: no checkpoint in {out / 'checkpoints'} to resume from")
        path = found[-1]
    if not (path / "trainer_state.pt").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise InvalidRequestError(f"resume: {path} is not a checkpoint (no trainer_state.pt and adapter)")
    return path


def _checked(path: str) -> list[tuple[int, dict]]:
    return [(n, check_record(r, f"{path} line {n}")) for n, r in read_jsonl(path)]


def has_checkpoint(out: str | Path) -> bool:
    return bool(_checkpoints(Path(out) / "checkpoints"))


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]


def _step_of(p: Path) -> int:
    return int(p.name[5:])


def _check_writable(out: Path) -> None:
    """OUT exists (or can be made) and takes files; else a clear error before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InvalidRequestError(f"out: cannot write to {out}: {e.strerror or e}") from None
