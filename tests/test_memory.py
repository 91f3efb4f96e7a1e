"""Semantic memory with the real all-MiniLM-L6-v2 embedder on real SQLite files: what it
stores, what each recall may see, and what it refuses."""

from __future__ import annotations

import threading

import pytest

from llmos.errors import InvalidRequestError
from llmos.kernel.memory import Memory, MemoryFull, SemanticMemory

T, SHARED = "acme", "tenant"

FACTS = [
    "Alice Novak resides in Lisbon now.",
    "Bruno Rossi is employed by Airbus.",
    "Chen Tanaka keeps a parrot as a pet.",
    "Dara Weber's favourite dish is paella.",
    "Emil Horvat spends weekends on rock climbing.",
    "Fatima Okafor gets around in a Fiat Panda.",
    "Goran Petrov can hold a conversation in Icelandic.",
    "Hana Moreau practises the cello every evening.",
    "Ivan Jansen trains for badminton twice a week.",
    "Jonas Varga decorated the flat in turquoise.",
    "Alice Novak is employed by Spotify.",
    "Bruno Rossi keeps a tortoise as a pet.",
]
# (question in other words, the fact that answers it)
QUESTIONS = [
    ("Where does Alice Novak live?", 0),
    ("Which company does Bruno Rossi work for?", 1),
    ("What animal does Chen Tanaka have?", 2),
    ("What meal does Dara Weber like best?", 3),
    ("What does Emil Horvat do for fun?", 4),
    ("Which automobile belongs to Fatima Okafor?", 5),
    ("Which tongue is Goran Petrov able to talk in?", 6),
    ("Which instrument is Hana Moreau good at?", 7),
    ("How does Ivan Jansen keep fit?", 8),
    ("What hue does Jonas Varga like most?", 9),
    ("Who is Alice Novak's employer?", 10),
    ("Does Bruno Rossi have any pets?", 11),
]


@pytest.fixture(scope="module")
def embed():
    from llmos.models.embedder import Embedder
    embedder = Embedder()
    return embedder.embed


@pytest.fixture
def mem(tmp_path, embed):
    m = SemanticMemory(tmp_path / "memory.db", embed)
    yield m
    m.close()


def texts(memories: list[Memory]) -> list[str]:
    return [m.text for m in memories]


def test_remember_recall_forget(mem):
    ids = mem.remember_many(T, SHARED, FACTS)
    assert len(set(ids)) == len(FACTS) and mem.count(T) == len(FACTS) == mem.count(T, SHARED)
    got = mem.recall(T, [SHARED], "Where does Alice Novak live?", k=3)
    assert got[0].text == FACTS[0] and got[0].id == ids[0] and got[0].scope == SHARED
    assert [m.score for m in got] == sorted((m.score for m in got), reverse=True)
    assert mem.forget(T, [SHARED], ids[0]) is True
    assert FACTS[0] not in texts(mem.recall(T, [SHARED], "Where does Alice Novak live?", k=5))
    assert mem.forget(T, [SHARED], ids[0]) is False
    assert mem.count(T) == len(FACTS) - 1


def recall_at(mem, k: int, mode: str) -> float:
    return sum(FACTS[i] in texts(mem.recall(T, [SHARED], q, k=k, mode=mode)) for q, i in QUESTIONS) / len(QUESTIONS)


def test_hybrid_at_least_each_single_mode(mem):
    mem.remember_many(T, SHARED, FACTS)
    hybrid, vector, keyword = (recall_at(mem, 2, mode) for mode in ("hybrid", "vector", "keyword"))
    assert hybrid >= vector and hybrid >= keyword, (hybrid, vector, keyword)
    assert hybrid >= 0.9


def test_filter_is_equality_on_metadata(mem):
    mem.remember(T, SHARED, "The red car is fast.", {"topic": "cars", "year": 2020})
    mem.remember(T, SHARED, "The blue car is slow.", {"topic": "cars", "year": 2021, "sold": True})
    mem.remember(T, SHARED, "The red apple is sweet.", {"topic": "fruit"})
    assert set(texts(mem.recall(T, [SHARED], "red", filter={"topic": "cars"}))) == \
        {"The red car is fast.", "The blue car is slow."}
    assert texts(mem.recall(T, [SHARED], "car", filter={"year": 2021})) == ["The blue car is slow."]
    assert texts(mem.recall(T, [SHARED], "car", filter={"sold": True})) == ["The blue car is slow."]
    assert mem.recall(T, [SHARED], "car", filter={"sold": 1}) == []      # JSON forms differ
    assert mem.recall(T, [SHARED], "car", filter={"topic": "boats"}) == []
    assert texts(mem.recall(T, [SHARED], "red", filter={"topic": "fruit"}, mode="keyword")) == \
        ["The red apple is sweet."]


def test_tenants_never_see_each_other(mem):
    mine = mem.remember("acme", SHARED, "The launch code is 1234.")
    mem.remember("globex", SHARED, "The launch code is 9999.")
    for mode in ("hybrid", "vector", "keyword"):
        assert texts(mem.recall("globex", [SHARED], "launch code", mode=mode)) == ["The launch code is 9999."]
        assert texts(mem.recall("acme", [SHARED], "launch code", mode=mode)) == ["The launch code is 1234."]
    assert mem.recall("initech", [SHARED], "launch code") == []
    assert mem.forget("globex", [SHARED], mine) is False
    assert mem.count("acme") == 1 and mem.count("globex") == 1


def test_process_scopes_are_private(mem):
    mem.remember(T, "proc:1", "My scratch note: the answer is 42.")
    mem.remember(T, "proc:2", "My scratch note: the answer is 7.")
    mem.remember(T, SHARED, "Team note: the answer is in the wiki.")
    assert texts(mem.recall(T, ["proc:1"], "the answer")) == ["My scratch note: the answer is 42."]
    both = texts(mem.recall(T, ["proc:2", SHARED], "the answer"))
    assert sorted(both) == ["My scratch note: the answer is 7.", "Team note: the answer is in the wiki."]
    note = mem.recall(T, ["proc:1"], "the answer")[0].id
    assert mem.forget(T, ["proc:2", SHARED], note) is False
    assert mem.count(T, "proc:1") == 1 and mem.count(T) == 3


def test_survives_reopen(tmp_path, embed):
    m = SemanticMemory(tmp_path / "m.db", embed)
    ids = m.remember_many(T, SHARED, FACTS)
    m.forget(T, [SHARED], ids[1])
    m.close()
    m = SemanticMemory(tmp_path / "m.db", embed)
    assert m.count(T) == len(FACTS) - 1
    assert m.recall(T, [SHARED], "Where does Alice Novak live?", k=1)[0].id == ids[0]
    assert m.recall(T, [SHARED], "Bruno Rossi Airbus", k=1, mode="keyword")[0].text != FACTS[1]
    m.close()


def test_superseded_fact_comes_after_the_new_one(mem):
    mem.remember_many(T, SHARED, FACTS[1:])
    mem.remember(T, SHARED, "Alice lives in Paris.", created_at=1000.0)
    mem.remember(T, SHARED, "Alice has moved to Berlin.", created_at=2000.0)
    got = texts(mem.recall(T, [SHARED], "Where does Alice live?", k=3))
    assert got.index("Alice has moved to Berlin.") < got.index("Alice lives in Paris.")


def test_superseded_fact_by_subject_and_attribute(mem):
    mem.remember_many(T, SHARED, FACTS[:3] + FACTS[4:])
    slot = {"subject": "Dara Weber", "attribute": "food"}
    for when, text in ((1.0, "Dara Weber loves paella."), (2.0, "Dara Weber would eat sushi every day."),
                       (3.0, "Nothing beats goulash for Dara Weber.")):
        mem.remember(T, SHARED, text, slot, created_at=when)
    got = mem.recall(T, [SHARED], "What meal does Dara Weber like best?", k=5)
    assert got[0].text == "Nothing beats goulash for Dara Weber."
    assert texts(got).index("Dara Weber would eat sushi every day.") < texts(got).index("Dara Weber loves paella.")


def test_threads_share_one_memory(mem):
    errors = []

    def work(n: int) -> None:
        try:
            for i in range(5):
                mem.remember(T, f"proc:{n}", f"Thread {n} note {i}.")
                mem.recall(T, [f"proc:{n}"], "note")
        except Exception as e:      # collected for the main thread's assert
            errors.append(e)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mem.count(T) == 20


@pytest.mark.parametrize("call, field", [
    (lambda m: m.remember(T, SHARED, ""), "text"),
    (lambda m: m.remember(T, SHARED, "   "), "text"),
    (lambda m: m.remember(T, SHARED, 42), "text"),
    (lambda m: m.remember(T, SHARED, "x" * 8193), "text"),
    (lambda m: m.remember("", SHARED, "hello"), "tenant"),
    (lambda m: m.remember(None, SHARED, "hello"), "tenant"),
    (lambda m: m.remember(T, 3, "hello"), "scope"),
    (lambda m: m.remember(T, SHARED, "hello", {"when": object()}), "metadata"),
    (lambda m: m.remember(T, SHARED, "hello", {"x": float("nan")}), "metadata"),
    (lambda m: m.remember(T, SHARED, "hello", ["not", "a", "dict"]), "metadata"),
    (lambda m: m.remember(T, SHARED, "hello", {"subject": 5, "attribute": "city"}), "metadata.subject"),
    (lambda m: m.remember(T, SHARED, "hello", created_at="yesterday"), "created_at"),
    (lambda m: m.remember_many(T, SHARED, []), "texts"),
    (lambda m: m.remember_many(T, SHARED, ["ok", ""]), "texts[1]"),
    (lambda m: m.remember_many(T, SHARED, ["ok"], [{}, {}]), "metadatas"),
    (lambda m: m.remember_many(T, SHARED, ["ok"], [{"f": {1, 2}}]), "metadatas[0]"),
    (lambda m: m.recall(T, [SHARED], "q", k=0), "k"),
    (lambda m: m.recall(T, [SHARED], "q", k=101), "k"),
    (lambda m: m.recall(T, [SHARED], "q", k="5"), "k"),
    (lambda m: m.recall(T, [SHARED], "q", mode="fuzzy"), "mode"),
    (lambda m: m.recall(T, [SHARED], ""), "query"),
    (lambda m: m.recall(T, [], "q"), "scopes"),
    (lambda m: m.recall(T, SHARED, "q"), "scopes"),
    (lambda m: m.recall(T, [SHARED, 7], "q"), "scopes[1]"),
    (lambda m: m.recall(T, [SHARED], "q", filter=["topic"]), "filter"),
    (lambda m: m.recall(T, [SHARED], "q", filter={"a'b": 1}), "filter"),
    (lambda m: m.recall(T, [SHARED], "q", filter={"topic": ["a"]}), "filter.topic"),
    (lambda m: m.forget(T, [SHARED], ""), "id"),
    (lambda m: m.forget(T, [SHARED], None), "id"),
    (lambda m: m.count(""), "tenant"),
])
def test_bad_input_names_the_field(mem, call, field):
    with pytest.raises(InvalidRequestError) as e:
        call(mem)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_full_tenant_is_refused(tmp_path, embed):
    m = SemanticMemory(tmp_path / "small.db", embed, max_items_per_tenant=3)
    m.remember_many(T, SHARED, FACTS[:2])
    with pytest.raises(MemoryFull, match="holds 2 memories of its 3"):
        m.remember_many(T, SHARED, FACTS[2:4])
    first = m.remember(T, "proc:1", FACTS[2])
    with pytest.raises(MemoryFull):
        m.remember(T, SHARED, FACTS[3])
    m.remember("other", SHARED, FACTS[3])          # the bound is per tenant
    m.forget(T, ["proc:1"], first)
    m.remember(T, SHARED, FACTS[3])
    assert m.count(T) == 3
    m.close()


def test_wrong_dimension_file_is_refused(tmp_path, embed):
    m = SemanticMemory(tmp_path / "d.db", embed)
    m.remember(T, SHARED, "hello")
    m.close()
    with pytest.raises(InvalidRequestError, match="dim"):
        SemanticMemory(tmp_path / "d.db", embed, dim=512)
