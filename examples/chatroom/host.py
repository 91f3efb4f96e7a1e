"""A chat room: three agents talk on one topic for N rounds. The host spawns them, waits
until each has subscribed to the room, starts the conversation, and waits for the end;
the transcript is in the tenant's storage at chatroom/transcript.txt.

    llmos run examples/chatroom/host.py --wait -- 3
"""

import sys

from llmos import agent

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
NAMES = ["ada", "bob", "cy"]

room = f"room-{agent.pid}"
pids = [agent.spawn("speaker.py", name=f"{room}-{n}", args=[room, str(ROUNDS), str(agent.pid)],
                    caps=["llm", f"msg:topic:{room}", f"msg:send:{agent.name}", "fs:write:chatroom/*"])
        for n in NAMES]
ready = 0
while ready < len(NAMES):
    m = agent.recv(timeout=120)
    if m is None:
        sys.exit("the speakers did not get ready")
    ready += m.body == "ready"
    agent.ack(m)
agent.publish(room, {"start": True})
sys.exit(max(abs(agent.wait(pid) or 0) for pid in pids))
