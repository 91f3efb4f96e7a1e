"""What a fine-tuning run is asked to do: one plain dataclass, checked at the boundary.
Kept apart from the training loop so that reading it (the CLI, the server) needs no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmos.errors import InvalidRequestError
from llmos.validate import integer, number

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class FinetuneConfig:
    data: str
    out: str
    model: str = "smollm2-135m"
    rank: int = 8
    alpha: float | None = None            # LoRA scale is alpha / rank; None = 2 x rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    val_split: float = 0.1                # held out of `data` for validation, unless `val_data` is given
    val_data: str | None = None           # a JSONL file of validation records
    max_len: int = 512
    truncate: bool = False
    seed: int = 0
    warmup: float = 0.05                  # fraction of the steps spent warming up the learning rate
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 0                   # steps between checkpoints; 0 = at the end of each epoch
    keep_checkpoints: int = 2
    eval_every: int = 0                   # steps between validations; 0 = at the end of each epoch
    threads: int | None = None            # torch threads; None = torch's default
    resume: bool | str = False            # True = the newest checkpoint in OUT; a path = that one

    def check(self) -> FinetuneConfig:
        """Every field within range, each problem named; returns self."""
        integer("rank", self.rank, 1, 256)
        if self.alpha is not None:
            number("alpha", self.alpha, 0, 1e4, lo_open=True)
        number("dropout", self.dropout, 0, 0.9)
        integer("epochs", self.epochs, 1, 1000)
        number("lr", self.lr, 0, 1.0, lo_open=True)
        integer("batch_size", self.batch_size, 1, 4096)
        number("val_split", self.val_split, 0, 0.5)
        integer("max_len", self.max_len, 8, 131072)
        integer("seed", self.seed, 0, 2**31 - 1)
        number("warmup", self.warmup, 0, 0.5)
        number("weight_decay", self.weight_decay, 0, 1.0)
        number("grad_clip", self.grad_clip, 0, 1e6)
        integer("save_every", self.save_every, 0)
        integer("keep_checkpoints", self.keep_checkpoints, 1, 1000)
        integer("eval_every", self.eval_every, 0)
        if self.threads is not None:
            integer("threads", self.threads, 1, 1024)
        if self.schedule not in SCHEDULES:
            raise InvalidRequestError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not isinstance(self.target_modules, list) or not self.target_modules or \
                not set(self.target_modules) <= set(LORA_TARGETS):
            raise InvalidRequestError(f"target_modules: must be a non-empty list of {', '.join(LORA_TARGETS)}, "
                                      f"got {self.target_modules!r}")
        return self

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank
