"""The process a fine-tuning job runs in: `python -m llmos.train.worker SPEC.json`.

It lowers its own CPU priority first, before torch starts its compute threads (which
inherit it), so that serving in the same machine always runs before training: SCHED_IDLE
where the kernel allows it, else nice 19. It reports as JSON lines on stdout, one event a
line, which the kernel's job runner reads (llmos/kernel/jobs.py). Resuming is automatic: a
job whose OUT already holds a checkpoint continues from the newest one.
"""

from __future__ import annotations

import json
import os
import sys


def lower_priority() -> str:
    """Make this process (and every thread it starts later) yield the CPU to everything else."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        pass
    try:
        return f"nice {os.nice(19)}"
    except OSError:
        return "unchanged"


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    try:
        spec = json.loads(open(argv[0]).read())
    except (OSError, ValueError) as e:
        emit({"type": "error", "message": f"cannot read the job's spec {argv[0]}: {e}"})
        return 2
    # "priority": "normal" keeps the default priority (the benchmark's comparison)
    priority = "normal" if spec.get("priority") == "normal" else lower_priority()
    from llmos.errors import LLMOSError
    from llmos.train.config import FinetuneConfig
    from llmos.train.finetune import Finetune, has_checkpoint
    try:
        config = FinetuneConfig(**{k: v for k, v in spec.items() if k in FinetuneConfig.__dataclass_fields__})
        config.resume = has_checkpoint(config.out)
        emit({"type": "priority", "scheduling": priority, "resume": config.resume})
        Finetune(config).run(emit)
    except (LLMOSError, TypeError, ValueError, OSError) as e:
        emit({"type": "error", "message": str(e)})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
