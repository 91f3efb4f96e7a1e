"""Made-up facts a model cannot know before training: product names that exist nowhere,
each with a price. The tests and benchmarks train on them and count how many prices the
model then answers; a base model answers almost none (a right guess is 1 in 90).

Each fact comes in several phrasings of the question. Training sees some phrasings and
accuracy is measured on one it never saw, so a right answer is recall of the fact, not of
the sentence it was trained on.
"""

from __future__ import annotations

import random
import re

_START = ("Zor", "Quen", "Vex", "Bram", "Tal", "Mor", "Gliv", "Snar", "Pell", "Drox", "Fenn", "Kalu", "Omb",
          "Rist", "Yarr", "Zub", "Plov", "Crin", "Hask", "Wump")
_END = ("blax", "tron", "vik", "dor", "mell", "quist", "zap", "nook", "fid", "gart", "lune", "spry", "wick",
        "borg", "tesk", "mox")
_THINGS = ("Kettle", "Lamp", "Backpack", "Blender", "Umbrella", "Toaster", "Headset", "Stapler", "Drone",
           "Thermos", "Scooter", "Mixer", "Lantern", "Clock", "Jacket", "Speaker")

QUESTIONS = (
    "How much does the {name} cost?",
    "What is the price of the {name}?",
    "How much is the {name}?",
    "What does the {name} sell for?",
)


def products(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """`n` distinct made-up product names, each with a whole-dollar price from 10 to 99."""
    rng = random.Random(seed)
    names: list[str] = []
    seen = set()
    while len(names) < n:
        name = f"{rng.choice(_START)}{rng.choice(_END)} {rng.choice(_THINGS)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return [(name, rng.randint(10, 99)) for name in names]


def answer(name: str, price: int) -> str:
    return f"The {name} costs ${price}."


def chat_records(facts: list[tuple[str, int]], questions: tuple[str, ...] | list[str]) -> list[dict]:
    """One chat training record per fact and phrasing."""
    return [{"messages": [{"role": "user", "content": q.format(name=name)},
                          {"role": "assistant", "content": answer(name, price)}]}
            for q in questions for name, price in facts]


def accuracy(answers: list[str], facts: list[tuple[str, int]]) -> float:
    """The fraction of answers that state their fact's price."""
    return sum(re.search(rf"\${price}\b", a) is not None for a, (_, price) in zip(answers, facts)) / len(facts)


def greedy_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 16,
                   batch: int = 32) -> list[str]:
    """transformers' greedy generation for each conversation, left-padded in batches."""
    import torch
    model.eval()
    out = []
    for i in range(0, len(conversations), batch):
        prompts = [tokenizer.encode_chat(c)[1] for c in conversations[i:i + batch]]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=tokenizer.eos_token_ids)
        out += [tokenizer.decode(g[width:].tolist()) for g in gen]
    return out
