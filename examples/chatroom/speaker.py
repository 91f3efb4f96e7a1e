"""One voice in the chat room: each round it says one line, given what the others said in
the round before, and publishes it on the room's topic."""

import sys

from llmos import agent

room, rounds, host = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
me = agent.name.rsplit("-", 1)[1]
agent.subscribe(room)
agent.send(host, "ready")
heard: dict[int, list[str]] = {}
started = False
while not started:
    m = agent.recv(timeout=120)
    if m is None:
        sys.exit("the room never started")
    started = m.body == {"start": True}
    if isinstance(m.body, dict) and "round" in m.body:
        heard.setdefault(m.body["round"], []).append(f"{m.body['who']}: {m.body['line']}")
    agent.ack(m)
last: list[str] = []
for r in range(rounds):
    prompt = "You are in a friendly chat about the weather. " + (" ".join(last) or "Start the conversation.")
    line = agent.chat([{"role": "user", "content": prompt + f" Reply as {me} in one short sentence."}],
                      max_tokens=24, temperature=0.0).strip().replace("\n", " ")
    agent.publish(room, {"round": r, "who": me, "line": line})
    agent.fs.append("chatroom/transcript.txt", f"{r} {me}: {line}\n")
    while len(heard.get(r, [])) < 3:        # our own copy comes too: 3 lines per round
        m = agent.recv(timeout=120)
        if m is None:
            sys.exit(f"round {r}: the others went quiet")
        if isinstance(m.body, dict) and "round" in m.body:
            heard.setdefault(m.body["round"], []).append(f"{m.body['who']}: {m.body['line']}")
        agent.ack(m)
    last = [h for h in heard[r] if not h.startswith(f"{me}:")]
