"""Map-reduce with agents: the coordinator splits a text into parts, spawns one worker per
part with narrower capabilities (the model, and sending to the coordinator only), sends
each its part, collects the summaries as messages and writes the combined summary.

    llmos run examples/mapreduce/coordinator.py --cap llm --cap proc:spawn --cap msg \
        --cap 'fs:write:mapreduce/*' --wait
"""

import sys

from llmos import agent

TEXT = """\
The water cycle moves water between the oceans, the air and the land. Sunlight warms the sea and water evaporates.
Water vapour rises, cools and condenses into clouds. Droplets in clouds grow until they fall as rain or snow.
Rain runs off into rivers or soaks into the ground, where it feeds plants and refills underground aquifers.
Rivers carry water back to the oceans, and the cycle begins again, shaping weather and climate everywhere."""

WORKERS = 4


def main() -> int:
    lines = (open(sys.argv[1]).read() if len(sys.argv) > 1 else TEXT).splitlines()
    parts = [" ".join(lines[i::WORKERS]) for i in range(WORKERS)]
    pids = []
    for i, part in enumerate(parts):
        name = f"{agent.name}-worker-{i}"
        pids.append(agent.spawn("worker.py", name=name, caps=["llm", f"msg:send:{agent.name}"],
                                args=[str(i)], max_tokens=2000))
        agent.send(name, {"index": i, "text": part})
    summaries = {}
    while len(summaries) < WORKERS:
        m = agent.recv(timeout=300)
        if m is None:
            print("timed out waiting for the workers", file=sys.stderr)
            return 1
        summaries[m.body["index"]] = m.body["summary"]
        agent.ack(m)
    codes = [agent.wait(pid) for pid in pids]
    combined = "\n".join(f"{i + 1}. {summaries[i]}" for i in range(WORKERS))
    agent.fs.write("mapreduce/summary.txt", combined + "\n")
    print(combined)
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
