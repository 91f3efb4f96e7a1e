"""Semantic memory: the kernel's SemanticMemory (sqlite-vec + FTS5, fused) with the real
all-MiniLM-L6-v2 embedder, on facts about generated people, in one run.

1 supersession  facts that change: 120 (person, attribute) slots, each stated, then updated
                1-3 times in other words, among the people's other facts; asked about in
                still other words: how often the newest value ranks above every older one.
                With plain texts (the implicit, near-duplicate rule) and with subject and
                attribute in metadata (the explicit rule).
2 retrieval     600 facts about people and 160 naming identifiers (order, ticket, invoice
                numbers), 320 questions asked in other words than their facts ("Where does
                Alice Novak live?" for "Alice Novak resides in Lisbon now."): recall@5 of
                hybrid, vector-only and keyword-only, and hybrid without version grouping.
3 latency       remember and recall p50/p99 at 10k and 100k memories, bulk-loaded with
                remember_many; recall time includes embedding the query.
4 long_conversation, 5 kv_warm, 6 tool_overhead: conversations longer than the window,
                an idle conversation's KV after other traffic, and the tool pool's cost per
                call (benchmarks/conversation.py).

Everything is generated from fixed seeds in this file; nothing is downloaded.

    python benchmarks/memory.py [--part NAME ...] [--write]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (as in benchmarks/scheduling.py): spinning
# ones turn a 10 ms query embedding into 50 ms on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import conversation  # noqa: E402
from benchmarks.common import markdown_table, write_section  # noqa: E402

from llmos.kernel.memory import SemanticMemory  # noqa: E402
from llmos.models.embedder import Embedder  # noqa: E402

FIRST = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jonas", "Keiko", "Lars",
         "Maya", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tomas", "Uma", "Viktor", "Wen", "Xavier",
         "Yara", "Zoe", "Aaron", "Bianca", "Carlos", "Diego"]
LAST = ["Abbott", "Brennan", "Castillo", "Dubois", "Eriksen", "Fischer", "Gallagher", "Horvat", "Ibarra",
        "Jansen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quintero", "Rossi",
        "Schneider", "Tanaka", "Ueda", "Varga", "Weber", "Yilmaz", "Zimmermann"]

# attribute: (values, ways to state it, ways to ask about it). The questions avoid the
# statements' key words, so a keyword match finds the person but not the attribute.
ATTRIBUTES = {
    "city": (["Paris", "Berlin", "Lisbon", "Oslo", "Madrid", "Vienna", "Prague", "Dublin", "Warsaw", "Athens",
              "Helsinki", "Zurich", "Budapest", "Rome", "Amsterdam", "Copenhagen", "Krakow", "Seville"],
             ["{s} lives in {v}.", "{s} resides in {v} now.", "{s} has settled down in {v}.",
              "These days {s} makes a home in {v}."],
             ["Where does {s} live?", "Which city is {s} based in?", "What town is {s}'s residence?"]),
    "employer": (["Siemens", "Nokia", "Airbus", "Spotify", "Philips", "Bosch", "Ikea", "Lego", "Heineken",
                  "Volvo", "Nestle", "Unilever", "Ericsson", "Zara", "Ryanair", "Adidas", "Danone", "Shell"],
                 ["{s} works at {v}.", "{s} is employed by {v}.", "{s} has a job with {v}.",
                  "{s} draws a salary from {v}."],
                 ["Which company does {s} work for?", "Who is {s}'s employer?", "Where is {s} on the payroll?"]),
    "pet": (["a beagle", "a tabby cat", "a parrot", "two goldfish", "a hamster", "a tortoise", "a poodle",
             "a rabbit", "a ferret", "a husky", "a canary", "an iguana", "a dachshund", "a siamese cat"],
            ["{s} owns {v}.", "{s} keeps {v} as a pet.", "{s} adopted {v}.", "{s} looks after {v} at home."],
            ["What animal does {s} have?", "Does {s} have any pets?", "Which creature shares {s}'s house?"]),
    "food": (["sushi", "lasagne", "paella", "ramen", "goulash", "falafel", "pierogi", "moussaka", "tacos",
              "risotto", "pad thai", "borscht", "curry", "dumplings", "pho", "gnocchi"],
             ["{s}'s favourite dish is {v}.", "{s} loves eating {v}.", "Nothing beats {v} for {s}.",
              "{s} would order {v} every single day."],
             ["What meal does {s} like best?", "Which cuisine makes {s} happiest at dinner?",
              "What should I cook for {s}?"]),
    "hobby": (["rock climbing", "chess", "pottery", "sailing", "birdwatching", "knitting", "fencing",
               "photography", "gardening", "surfing", "archery", "calligraphy", "origami", "woodworking"],
              ["{s} spends weekends on {v}.", "{s}'s hobby is {v}.", "{s} is passionate about {v}.",
               "In free time {s} enjoys {v}."],
              ["What does {s} do for fun?", "How does {s} relax after work?", "What pastime is {s} into?"]),
    "car": (["a Tesla", "a Volkswagen Golf", "a Fiat Panda", "a Toyota Prius", "a Renault Clio", "a Skoda Octavia",
             "a BMW X3", "a Mini Cooper", "a Peugeot 208", "a Subaru Outback", "a Ford Focus", "a Honda Civic"],
            ["{s} drives {v}.", "{s} bought {v}.", "{s} gets around in {v}.", "{s}'s vehicle is {v}."],
            ["What car does {s} have?", "Which automobile belongs to {s}?", "What does {s} commute with?"]),
    "language": (["Portuguese", "Japanese", "Swahili", "Icelandic", "Korean", "Greek", "Turkish", "Hindi",
                  "Finnish", "Arabic", "Dutch", "Hungarian", "Polish", "Vietnamese"],
                 ["{s} speaks {v} fluently.", "{s} is learning {v}.", "{s} took lessons in {v}.",
                  "{s} can hold a conversation in {v}."],
                 ["Which tongue is {s} able to talk in?", "What foreign language does {s} know?",
                  "What language could I use to chat with {s}?"]),
    "instrument": (["the cello", "the violin", "the drums", "the saxophone", "the piano", "the trumpet",
                    "the harp", "the bass guitar", "the flute", "the accordion", "the banjo", "the clarinet"],
                   ["{s} plays {v}.", "{s} practises {v} every evening.", "{s} performs on {v} in a band.",
                    "{s} took up {v} last year."],
                   ["What music does {s} make?", "Which instrument is {s} good at?",
                    "What does {s} bring to a jam session?"]),
    "sport": (["tennis", "football", "basketball", "volleyball", "badminton", "rugby", "swimming", "cycling",
               "handball", "squash", "rowing", "skiing", "judo", "golf"],
              ["{s} competes in {v}.", "{s} trains for {v} twice a week.", "{s} is on a {v} team.",
               "{s} is a keen {v} player."],
              ["Which sport does {s} do?", "What game does {s} play competitively?",
               "How does {s} keep fit?"]),
    "color": (["teal", "crimson", "ochre", "lavender", "navy blue", "emerald green", "mustard yellow",
               "burgundy", "coral", "charcoal grey", "turquoise", "magenta"],
              ["{s}'s favourite colour is {v}.", "{s} paints everything {v}.", "{s} always wears {v}.",
               "{s} decorated the flat in {v}."],
              ["What shade does {s} prefer?", "Which hue does {s} like most?", "What tint would {s} choose?"]),
}
TENANT, SCOPE = "bench", "tenant"


def people(rng: random.Random, n: int) -> list[str]:
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    return names[:n]


def state(rng: random.Random, person: str, attribute: str, value: str, avoid: str | None = None) -> str:
    """One statement of a fact, in a phrasing other than `avoid`'s."""
    templates = [t for t in ATTRIBUTES[attribute][1] if t != avoid]
    return rng.choice(templates).format(s=person, v=value)


def ask(rng: random.Random, person: str, attribute: str) -> str:
    return rng.choice(ATTRIBUTES[attribute][2]).format(s=person)


def open_memory(tmp: str, embedder: Embedder, name: str) -> SemanticMemory:
    return SemanticMemory(Path(tmp) / f"{name}.db", embedder.embed)


def supersession(embedder: Embedder, tmp: str, seed: int = 1) -> dict:
    """Each slot gets its versions at rising times, interleaved with the other facts of the
    same people (all at random times), so recency alone does not sort the answer."""
    rng = random.Random(seed)
    persons = people(rng, 40)
    slots = rng.sample([(p, a) for p in persons for a in ATTRIBUTES], 120)
    history: dict[tuple[str, str], list[tuple[str, float]]] = {}
    background = []
    for person in persons:
        for attribute in ATTRIBUTES:
            if (person, attribute) not in slots:
                background.append((state(rng, person, attribute, rng.choice(ATTRIBUTES[attribute][0])),
                                   None, rng.uniform(0, 1000)))
    for person, attribute in slots:
        values = rng.sample(ATTRIBUTES[attribute][0], rng.randint(2, 4))
        when, texts, template = rng.uniform(0, 300), [], None
        for value in values:
            template = rng.choice([t for t in ATTRIBUTES[attribute][1] if t != template])
            texts.append((template.format(s=person, v=value), when))
            when += rng.uniform(50, 300)
        history[(person, attribute)] = texts
    questions = {slot: ask(rng, *slot) for slot in slots}
    out = {"slots": len(slots), "updates": sum(len(h) - 1 for h in history.values()), "facts":
           len(background) + sum(len(h) for h in history.values())}
    for variant in ("plain text", "subject+attribute metadata"):
        mem = open_memory(tmp, embedder, f"supersession-{len(out)}")
        keyed = variant != "plain text"
        for text, _, when in background:
            mem.remember(TENANT, SCOPE, text, created_at=when)
        for (person, attribute), texts in history.items():
            for text, when in texts:
                meta = {"subject": person, "attribute": attribute} if keyed else None
                mem.remember(TENANT, SCOPE, text, meta, created_at=when)
        wins = 0
        for slot, question in questions.items():
            ranked = [m.text for m in mem.recall(TENANT, [SCOPE], question, k=10)]
            texts = [t for t, _ in history[slot]]
            places = [ranked.index(t) if t in ranked else len(ranked) for t in texts]
            wins += places[-1] < len(ranked) and all(places[-1] < p for p in places[:-1])
        out[variant] = wins / len(slots)
        mem.close()
    return out


IDENTIFIED = [  # facts naming an identifier, as agents' memories of orders, tickets and invoices do
    (["{i} ships from the {v} depot.", "Order {i} is dispatched from our {v} warehouse."],
     ["From which warehouse does order {i} leave?", "Where will parcel {i} be sent out from?"],
     ["Leeds", "Rotterdam", "Lyon", "Gdansk", "Porto", "Graz", "Malmo", "Turin"]),
    (["Ticket {i} is assigned to {v}.", "Support case {i} belongs to {v}."],
     ["Who is handling issue {i}?", "Which colleague owns request {i}?"],
     ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana"]),
    (["Invoice {i} was paid on {v}.", "Bill {i} got settled on {v}."],
     ["When was payment {i} made?", "On what day did we clear invoice {i}?"],
     ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]),
]


def identified(rng: random.Random, n: int) -> tuple[list[str], list[tuple[str, str]]]:
    """n facts about identifiers such as QX-7741 and one paraphrased question per fact."""
    facts, questions, used = [], [], set()
    while len(facts) < n:
        states, asks, values = rng.choice(IDENTIFIED)
        ident = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}-{rng.randrange(1000, 10000)}"
        if ident in used:
            continue
        used.add(ident)
        fact = rng.choice(states).format(i=ident, v=rng.choice(values))
        facts.append(fact)
        questions.append((rng.choice(asks).format(i=ident), fact))
    return facts, questions


def retrieval(embedder: Embedder, tmp: str, seed: int = 2) -> dict:
    rng = random.Random(seed)
    persons = people(rng, 60)
    facts = {(p, a): state(rng, p, a, rng.choice(ATTRIBUTES[a][0])) for p in persons for a in ATTRIBUTES}
    asked = rng.sample(sorted(facts), 240)
    about_people = [(ask(rng, *slot), facts[slot]) for slot in asked]
    id_facts, about_ids = identified(rng, 160)
    about_ids = rng.sample(about_ids, 80)
    mem = open_memory(tmp, embedder, "retrieval")
    for text in [*facts.values(), *id_facts]:
        mem.remember(TENANT, SCOPE, text, created_at=float(rng.uniform(0, 1000)))
    out = {"facts": len(facts) + len(id_facts), "questions": len(about_people) + len(about_ids),
           "id_facts": len(id_facts), "id_questions": len(about_ids)}
    runs = [("hybrid", "hybrid"), ("vector", "vector"), ("keyword", "keyword"),
            ("hybrid, no version grouping", "hybrid")]
    for name, mode in runs:
        if name.endswith("grouping"):
            mem.VERSION_LINK = 3.0      # above any cosine sum: the implicit rule is off
        hits = {}
        for part, questions in (("people", about_people), ("identifiers", about_ids)):
            hits[part] = sum(answer in [m.text for m in mem.recall(TENANT, [SCOPE], q, k=5, mode=mode)]
                             for q, answer in questions)
        out[name] = sum(hits.values()) / out["questions"]
        out[name + " (people)"] = hits["people"] / len(about_people)
        out[name + " (identifiers)"] = hits["identifiers"] / len(about_ids)
    mem.close()
    return out


def corpus(rng: random.Random, n: int) -> tuple[list[str], list[dict]]:
    """n distinct statements about 750 people (names x phrasings x values leave room for 450k)."""
    persons = people(rng, len(FIRST) * len(LAST))
    seen, texts, metas = set(), [], []
    while len(texts) < n:
        person, attribute = rng.choice(persons), rng.choice(list(ATTRIBUTES))
        text = state(rng, person, attribute, rng.choice(ATTRIBUTES[attribute][0]))
        if text not in seen:
            seen.add(text)
            texts.append(text)
            metas.append({"topic": attribute})
    return texts, metas


def percentiles(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50) * 1000), float(np.percentile(seconds, 99) * 1000)


def timed(fn, args_list) -> list[float]:
    out = []
    for args in args_list:
        t = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t)
    return out


def latency(embedder: Embedder, tmp: str, seed: int = 3, sizes: tuple[int, ...] = (10_000, 100_000)) -> dict:
    """At each size: 200 recalls of generated questions (hybrid, k=5), 50 filtered recalls,
    200 single remembers (each then forgotten, so the size holds), and how exact the
    two-stage vector search is against a full float scan."""
    rng = random.Random(seed)
    texts, metas = corpus(rng, max(sizes) + 200)
    extra = texts[max(sizes):]
    mem = open_memory(tmp, embedder, "latency")
    out, loaded = {"sizes": {}}, 0
    queries = [(TENANT, [SCOPE], ask(rng, rng.choice(FIRST) + " " + rng.choice(LAST), rng.choice(list(ATTRIBUTES))))
               for _ in range(200)]
    embedder.embed([q for *_, q in queries[:8]])                   # warm up
    for size in sizes:
        t = time.perf_counter()
        for start in range(loaded, size, 1000):
            end = min(size, start + 1000)
            mem.remember_many(TENANT, SCOPE, texts[start:end], metas[start:end])
        load_s, step, loaded = time.perf_counter() - t, size - loaded, size
        recall = timed(mem.recall, queries)
        embed = timed(lambda q: embedder.embed([q]), [(q,) for *_, q in queries])
        filtered = timed(lambda *a: mem.recall(*a, filter={"topic": "car"}), queries[:50])
        ids = []
        remember = timed(lambda text: ids.append(mem.remember(TENANT, SCOPE, text)), [(x,) for x in extra])
        for mid in ids:
            mem.forget(TENANT, [SCOPE], mid)
        out["sizes"][size] = {"load_s": load_s, "loaded": step,
                              "recall": percentiles(recall), "embed": percentiles(embed),
                              "filtered": percentiles(filtered), "remember": percentiles(remember),
                              "exact@10": exactness(mem, embedder, [q for *_, q in queries[:50]])}
        print(size, out["sizes"][size], flush=True)
    mem.close()
    return out


def exactness(mem: SemanticMemory, embedder: Embedder, questions: list[str]) -> float:
    """Mean overlap of the vector search's 10 nearest (bit index, then exact re-scoring; before
    fusion and version ordering) with an exact scan of every stored vector."""
    rows = mem._db.execute("SELECT seq, vector FROM vectors").fetchall()
    seqs = [r[0] for r in rows]
    matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
    overlap = 0.0
    for q in questions:
        qvec = embedder.embed([q])[0]
        exact = {seqs[i] for i in np.argsort(-(matrix @ qvec))[:10]}
        got = {seq for seq, _ in mem._nearest(TENANT, [SCOPE], qvec, "", [])[:10]}
        overlap += len(exact & got) / 10
    return overlap / len(questions)


PARTS = {"supersession": supersession, "retrieval": retrieval, "latency": latency,
         "long_conversation": lambda embedder, tmp: conversation.long_conversation(),
         "kv_warm": lambda embedder, tmp: conversation.kv_warm(),
         "tool_overhead": lambda embedder, tmp: conversation.tool_overhead()}
TARGETS = {"supersession": 0.95, "retrieval": 0.9, "latency": 50.0}


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(results: dict) -> str:
    out = []
    if "supersession" in results:
        r = results["supersession"]
        rows = [[v, f"{r[v]:.3f}"] for v in ("plain text", "subject+attribute metadata")]
        out.append(f"### Supersession\n\n{r['slots']} (person, attribute) slots, {r['updates']} updates in "
                   f"rephrased words, {r['facts']} facts in all; each slot asked once in other words (k=10). "
                   f"Share of slots whose newest value ranks above every older value:\n\n"
                   + markdown_table(["facts stored as", "newest first"], rows)
                   + f"\n\nPlain text: **{r['plain text']:.3f}** (target >= {TARGETS['supersession']}: "
                   f"{verdict(r['plain text'] >= TARGETS['supersession'])}).")
    if "retrieval" in results:
        r = results["retrieval"]
        modes = ("hybrid", "vector", "keyword", "hybrid, no version grouping")
        best_single = max(r["vector"], r["keyword"])
        out.append(f"### Retrieval\n\n{r['facts']} facts, {r['questions']} questions phrased in other words "
                   f"than their facts: 600 facts about people (240 questions) and {r['id_facts']} facts that name "
                   f"an identifier such as an order or ticket number ({r['id_questions']} questions, e.g. "
                   f"\"Who is handling issue QX-7741?\" for \"Support case QX-7741 belongs to Hana.\"); "
                   f"recall@5:\n\n"
                   + markdown_table(["mode", "all", "people", "identifiers"],
                                    [[m, f"{r[m]:.3f}", f"{r[m + ' (people)']:.3f}", f"{r[m + ' (identifiers)']:.3f}"]
                                     for m in modes])
                   + f"\n\nHybrid **{r['hybrid']:.3f}** (target >= {TARGETS['retrieval']} and above both "
                   f"single modes: {verdict(r['hybrid'] >= TARGETS['retrieval'] and r['hybrid'] > best_single)}). "
                   f"On the people facts alone, whose questions share only the person's name with the fact, "
                   f"keywords add nothing to the vectors; on identifiers they do.")
    if "latency" in results:
        sizes = results["latency"]["sizes"]
        rows = [[f"{n:,}", f"{s['load_s']:.0f} s ({s['loaded'] / s['load_s']:.0f}/s)",
                 "%.1f / %.1f" % s["recall"], "%.1f / %.1f" % s["embed"], "%.1f / %.1f" % s["filtered"],
                 "%.1f / %.1f" % s["remember"], f"{s['exact@10']:.3f}"] for n, s in sizes.items()]
        top = sizes[max(sizes)]["recall"][1]
        out.append("### Latency\n\nOne tenant, one scope, hybrid recall with k=5; milliseconds p50 / p99. "
                   "Recall times include embedding the query (shown alone beside them); filtered recalls "
                   "add a metadata filter that 10% of memories pass; remember is one memory, embedding "
                   "included. Bulk load: remember_many in batches of 1,000 (rate of this step's rows). "
                   "exact@10: overlap of the vector search's 10 nearest (bit index, then exact re-scoring) "
                   "with a full float scan.\n\n"
                   + markdown_table(["memories", "bulk load", "recall", "query embedding", "filtered recall",
                                     "remember", "exact@10"], rows)
                   + f"\n\nRecall p99 at {max(sizes):,}: **{top:.1f} ms** (target <= {TARGETS['latency']:.0f}: "
                   f"{verdict(top <= TARGETS['latency'])}).")
    out += conversation.markdown(results)
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", action="append", choices=sorted(PARTS), help="run only these parts (repeatable)")
    ap.add_argument("--write", action="store_true", help="add or replace the Memory section of docs/benchmarks.md")
    args = ap.parse_args()
    embedder = Embedder()
    t0, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.part or PARTS:
            results[name] = PARTS[name](embedder, tmp)
            print(markdown({name: results[name]}) + "\n", flush=True)
    body = markdown(results) + f"\n\n{(time.perf_counter() - t0) / 60:.1f} minutes on {os.cpu_count()} cores."
    if args.write:
        write_section("Memory", " ".join(["python", "benchmarks/memory.py"] + sys.argv[1:]), body)


if __name__ == "__main__":
    main()
