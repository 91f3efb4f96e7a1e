"""A map-reduce worker: receives one part of the text, summarises it with the model, and
sends the summary back to the coordinator (the only process it may send to)."""

import sys

from llmos import agent

coordinator = agent.name.rsplit("-worker-", 1)[0]
m = agent.recv(timeout=120)
if m is None:
    sys.exit("no work arrived")
summary = agent.chat([{"role": "user", "content": f"Summarise in one sentence: {m.body['text']}"}],
                     max_tokens=40, temperature=0.0)
agent.send(coordinator, {"index": m.body["index"], "summary": summary.strip()})
agent.ack(m)
