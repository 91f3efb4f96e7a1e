"""Conversations longer than the window, on the real parts that decide what the model sees:
the default model's tokenizer for the budget, the real embedder and SQLite memory for
paging out and recall. The model's replies are scripted (the test is about what context is
assembled, not what a 135M model answers; the server test runs the model)."""

from __future__ import annotations

import pytest

from llmos.errors import InvalidRequestError
from llmos.kernel.conversation import ConversationStore
from llmos.kernel.memory import SemanticMemory
from llmos.models.embedder import Embedder

FACTS = ["My sister's name is Oriane.", "I keep bees on the roof of the garage.",
         "The wifi password is tangerine-42.", "My car is a green 1998 Volvo.", "I was born in Tromsø."]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def _store(tmp_path, embedder, tokenizer):
    memory = SemanticMemory(tmp_path / "memory.db", embedder.embed, embedder.dimensions)
    convs = ConversationStore(tmp_path / "conversations.db", memory, lambda t: len(tokenizer.encode(t)), budget=512)
    return memory, convs


def test_long_conversation_stays_in_budget_pages_out_recalls_and_survives_restart(tmp_path, embedder,
                                                                                   loaded_default):
    tok = loaded_default.tokenizer
    memory, convs = _store(tmp_path, embedder, tok)
    seen: list[list[dict]] = []

    def model(messages, sampling):
        seen.append(messages)
        return {"text": "Noted, thank you for telling me that.", "finish_reason": "stop"}

    for text in FACTS + [f"Let us talk about the number {n} for a while." for n in range(45)]:
        out = convs.send("t1", "chat", text, generate=model)
        assert out["context_tokens"] <= 512
    prompts = [sum(len(tok.encode(m["content"])) for m in msgs) for msgs in seen]
    assert max(prompts) <= 512
    # The prefix (system + working turns) changes only when turns are paged out, not every turn.
    evictions = sum(1 for a, b in zip(seen, seen[1:]) if b[:len(a) - 1] != a[:-1])
    assert 0 < evictions <= len(seen) // 4, evictions
    info = convs.get("t1", "chat").to_dict()
    assert info["turns"] == 100 and info["paged_out"] > 0 and info["summary"]
    memory.close()
    memory, convs = _store(tmp_path, embedder, tok)         # a restart: same files
    out = convs.send("t1", "chat", "What is the wifi password again?", generate=model)
    assert any("tangerine-42" in r for r in out["recalled"]), out["recalled"]
    assert "tangerine-42" in seen[-1][-1]["content"]         # recalled beside the new message
    assert convs.get("t1", "chat").to_dict()["turns"] == 102
    with pytest.raises(InvalidRequestError, match="no conversation"):
        convs.get("t2", "chat")                              # another tenant's conversation is not visible
    with pytest.raises(InvalidRequestError, match="name"):
        convs.send("t1", "../x", "hi", generate=model)
    with pytest.raises(InvalidRequestError, match="content"):
        convs.send("t1", "chat", "", generate=model)
    memory.close()
