"""LoRA fine-tuning on the real default model: it learns made-up facts it could not know,
the loss looks only at the assistant's tokens, the output is PEFT's format and PEFT reads it
to the same logits, a resumed run reaches the very weights of an uninterrupted one, bad
inputs are refused clearly, and fine-tuning runs as a kernel job over HTTP whose adapter
the server then serves.

The facts are made-up product names with prices. "Held out" is a phrasing of the question
that training never saw ("What is the price of the X?" after training only on "How much
does the X cost?"): no model can guess a made-up price for an unseen product, so the
check is that the fact was learned, not the sentence."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmos.cli import main as cli
from llmos.errors import InvalidRequestError
from llmos.train import synthetic
from llmos.train.synthetic import accuracy, greedy_answers
from llmos.train.dataset import IGNORE, encode_record
from llmos.train.config import FinetuneConfig
from llmos.train.finetune import Finetune
from test_server import MODEL, LongStream, ServerProcess, wait_for

SYSTEM = "Answer briefly."
TRAIN_Q, HELD_OUT_Q = synthetic.QUESTIONS[0], synthetic.QUESTIONS[1]
FACTS = synthetic.products(16, seed=1)
# Found by trying (one phrasing, ~40 tokens an example): rank 16 on every projection, lr 2e-3,
# batch 4 and 8 epochs answer 14 of these 16 prices in the held-out phrasing (23 of 24 facts,
# 10 epochs 16 of 16); 6 epochs about half; lr 3e-3 or 5e-3 settle on one price for every
# product instead.
SETTINGS = dict(rank=16, lr=2e-3, batch_size=4, epochs=8)


def records(facts, question, system=SYSTEM) -> list[dict]:
    return [{"messages": [{"role": "system", "content": system}] + r["messages"]}
            for r in synthetic.chat_records(facts, [question])]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def question(name: str, q: str = HELD_OUT_Q) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q.format(name=name)}]


# -- what the loss looks at -----------------------------------------------------------------------

def test_loss_mask_covers_only_assistant_tokens(loaded_default):
    tok = loaded_default.tokenizer
    rec = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Price?"},
                        {"role": "assistant", "content": "Not this one.", "weight": 0},
                        {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "$42, sir."},
                        {"role": "user", "content": "trailing turns are not trained"}]}
    ids, labels = encode_record(rec, tok)
    learned = [i for i, t in enumerate(labels) if t != IGNORE]
    assert all(labels[i] == ids[i] for i in learned)
    # the learned tokens are exactly the two weighted answers, each with its end-of-turn token
    end = tok.eos_token_ids[0]
    runs, run = [], []
    for i in learned:
        if run and i != run[-1] + 1:
            runs.append(run)
            run = []
        run.append(i)
    runs.append(run)
    assert [tok.decode([ids[i] for i in r], skip_special_tokens=False) for r in runs] == \
        ["Hello!<|im_end|>", "$42, sir.<|im_end|>"]
    assert all(ids[r[-1]] == end for r in runs)
    # the prompt before the last answer is token for token what the chat endpoint sends
    msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"][:6]]
    prompt = tok.encode_chat(msgs)[1]
    assert ids[:len(prompt)] == prompt and runs[-1][0] == len(prompt)
    assert len(ids) == runs[-1][-1] + 2          # the newline after the last answer, unlearned; nothing after

    ids, labels = encode_record({"prompt": "2 + 2 =", "completion": " 4"}, tok)
    assert ids == tok.encode("2 + 2 =") + tok.encode(" 4", add_special_tokens=False) + [end]
    assert [t for t in labels if t != IGNORE] == tok.encode(" 4", add_special_tokens=False) + [end]


# -- learning something new -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, loaded_default):
    """One real fine-tune: the facts in one phrasing, validated on the held-out phrasing."""
    out = tmp_path_factory.mktemp("facts")
    data = write_jsonl(out / "train.jsonl", records(FACTS, TRAIN_Q))
    val = write_jsonl(out / "val.jsonl", records(FACTS[:8], HELD_OUT_Q))
    ft = Finetune(FinetuneConfig(data=str(data), val_data=str(val), out=str(out / "adapter"), **SETTINGS),
                  loaded=loaded_default)
    tok = loaded_default.tokenizer
    before = greedy_answers(ft.model, tok, [question(n) for n, _ in FACTS])   # LoRA starts as a no-op (B = 0)
    events: list[dict] = []
    summary = ft.run(events.append)
    after = greedy_answers(ft.model, tok, [question(n) for n, _ in FACTS])
    return {"ft": ft, "out": Path(ft.out), "before": before, "after": after, "events": events, "summary": summary}


def test_finetuning_teaches_facts_the_model_did_not_know(trained):
    before, after = accuracy(trained["before"], FACTS), accuracy(trained["after"], FACTS)
    val = [e["val_loss"] for e in trained["events"] if e["type"] == "eval"]
    print(f"\nheld-out phrasing exact-match: before {before:.2f}, after {after:.2f}; "
          f"validation loss by epoch {[round(v, 3) for v in val]}")
    assert before <= 0.1
    assert after >= 0.4, trained["after"]
    assert len(val) == SETTINGS["epochs"] + 1 and val[-1] < 0.6 * val[0]
    assert trained["summary"]["finished"] and trained["summary"]["step"] == trained["ft"].total_steps
    # metrics.jsonl holds every step and every validation, in order
    rows = [json.loads(line) for line in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "step"] == list(range(1, trained["ft"].total_steps + 1))
    assert [r["val_loss"] for r in rows if r["type"] == "eval"] == val
    assert all(r["tokens_per_s"] > 0 for r in rows if r["type"] == "step")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_output_is_peft_format_and_peft_reproduces_the_logits(trained, loaded_default):
    from peft import PeftModel
    from llmos.models.loader import to_transformers
    from llmos.models.lora_loader import load_lora
    out = trained["out"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.29.mlp.down_proj.lora_B.weight" in names
    assert len(names) == 30 * 7 * 2
    peft = PeftModel.from_pretrained(to_transformers(loaded_default), str(out)).eval()
    ids = torch.tensor([loaded_default.tokenizer.encode_chat(question(FACTS[0][0]))[1]])
    with torch.no_grad():
        want = trained["ft"].model.eval()(input_ids=ids).logits
        got = peft(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    ckpt = load_lora(out, loaded_default.config)          # and llmos's own adapter loader reads it
    assert ckpt.rank == 16 and ckpt.format == "peft" and len(ckpt.pairs) == 30 * 7


def test_resume_from_a_checkpoint_reaches_the_same_weights(tmp_path, loaded_default):
    """Dropout on, so the RNG the checkpoint keeps matters too."""
    data = write_jsonl(tmp_path / "d.jsonl", records(FACTS[:8], TRAIN_Q))
    common = dict(data=str(data), rank=4, epochs=2, batch_size=2, lr=1e-3, dropout=0.1, val_split=0.25,
                  save_every=2, target_modules=["q_proj", "v_proj"])
    straight = Finetune(FinetuneConfig(out=str(tmp_path / "a"), **common), loaded=loaded_default)
    straight.run()
    assert straight.total_steps == 6

    first = Finetune(FinetuneConfig(out=str(tmp_path / "b"), **common), loaded=loaded_default)
    first.run(stop=lambda: first.step >= 3)              # killed after step 3; the last checkpoint is step 2
    assert first.step == 3 and not (tmp_path / "b" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-2"]
    resumed = Finetune(FinetuneConfig(out=str(tmp_path / "b"), resume=True, **common), loaded=loaded_default)
    events = []
    resumed.run(events.append)
    assert events[0] == {"type": "resume", "step": 2, "path": str(tmp_path / "b" / "checkpoints" / "step-2")}

    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count('"train_loss"') == 6

    def timeless(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "elapsed", "seconds")}
                for x in path.read_text().splitlines()]
    assert timeless(tmp_path / "a" / "metrics.jsonl") == timeless(tmp_path / "b" / "metrics.jsonl")
    # a checkpoint refuses to continue a different run
    with pytest.raises(InvalidRequestError, match=r"resume: .* made with lr=0.001"):
        Finetune(FinetuneConfig(out=str(tmp_path / "b"), resume=True, **{**common, "lr": 5e-4}),
                 loaded=loaded_default).run()


# -- bad inputs -----------------------------------------------------------------------------------

def test_bad_inputs_are_refused_clearly(tmp_path, capsys, default_model_path):
    good = records(FACTS[:4], TRAIN_Q)

    def run(*argv) -> tuple[int, str]:
        code = cli(["finetune", "-q", *argv])
        return code, capsys.readouterr().err

    def data(name, rows) -> str:
        return str(write_jsonl(tmp_path / name, rows))

    out = str(tmp_path / "out")
    cases = [
        (["--data", str(tmp_path / "missing.jsonl"), "--out", out], "missing.jsonl does not exist"),
        (["--data", data("empty.jsonl", ["", "  "]), "--out", out], "no records"),
        (["--data", data("bad.jsonl", [good[0], good[1], '{"messages": [']), "--out", out],
         "bad.jsonl line 3: not valid JSON"),
        (["--data", data("noasst.jsonl", [good[0], {"messages": [{"role": "user", "content": "hi"}]}]), "--out", out],
         "noasst.jsonl line 2: no assistant message to learn from"),
        (["--data", data("role.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}]), "--out", out],
         "role.jsonl line 1: messages[0] must be"),
        (["--data", data("shape.jsonl", [[1, 2]]), "--out", out], "shape.jsonl line 1: expected a JSON object"),
        (["--data", data("long.jsonl", good), "--out", out, "--max-len", "16"],
         "long.jsonl line 1: 39 tokens, more than max_len 16; shorten it, raise --max-len, or pass --truncate"),
        (["--data", data("ok.jsonl", good), "--out", out, "--rank", "0"],
         "rank: must be an integer in [1, 256], got 0"),
        (["--data", data("ok.jsonl", good), "--out", out, "--rank", "1000"], "rank: must be an integer in [1, 256]"),
        (["--data", data("ok.jsonl", good), "--out", out, "--lr", "-1"], "lr: must be a number in (0, 1]"),
        (["--data", data("ok.jsonl", good), "--out", str(tmp_path / "ok.jsonl" / "sub")], "out: cannot write to"),
        (["--data", data("ok.jsonl", good)], "out: --out DIR is needed"),
        (["--data", data("ok.jsonl", good), "--out", out, "--resume"], "resume: no checkpoint in"),
    ]
    cases.append((["--data", data("half.jsonl", ['{"prompt": "x"}']), "--submit", "--url", "http://127.0.0.1:9"],
                  "half.jsonl line 1: 'completion' must be a string"))     # checked here, before sending
    for argv, message in cases:
        code, err = run(*argv)
        assert code == 2 and message in err, (argv, err)
    assert not any((tmp_path / "out").glob("*.safetensors"))


def test_truncate_cuts_long_examples_and_the_cli_trains(tmp_path, capsys, default_model_path):
    """The whole command once, tiny: --truncate keeps an over-long example's first tokens."""
    long = {"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "word " * 60}]}
    data = write_jsonl(tmp_path / "d.jsonl", records(FACTS[:3], TRAIN_Q) + [long])
    code = cli(["finetune", "-q", "--data", str(data), "--out", str(tmp_path / "o"), "--rank", "2", "--epochs", "1",
                "--batch-size", "4", "--max-len", "48", "--truncate", "--val-split", "0",
                "--target-modules", "v_proj"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"adapter written to {tmp_path / 'o'}" in captured.out
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()
    assert "1 example(s) cut to --max-len" in captured.err + captured.out


# -- fine-tuning as a kernel job over HTTP ------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    s = ServerProcess(tmp_path_factory.mktemp("ft-server"))
    yield s
    assert s.stop() == 0, s.log.read_text()


def wait_job(http, job_id: str, timeout: float = 240) -> dict:
    done = wait_for(lambda: (j := http.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"]
                    in ("succeeded", "failed", "cancelled") and j, timeout=timeout, interval=0.5)
    assert done, http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    return done


def test_job_from_the_cli_trains_reports_and_serves(server, tmp_path, capsys, monkeypatch):
    """`llmos finetune --submit --wait` sends the records, the server trains them as a job,
    reports its progress and loss, and serves the adapter as MODEL:SUFFIX."""
    monkeypatch.setenv("LLMOS_API_KEY", server.admin_key)
    data = write_jsonl(tmp_path / "d.jsonl", records(FACTS[:8], TRAIN_Q))
    code = cli(["finetune", "-q", "--data", str(data), "--submit", "--wait", "--suffix", "prices", "--rank", "4",
                "--epochs", "1", "--batch-size", "4", "--val-split", "0.25", "--url", server.url])
    out = capsys.readouterr().out
    assert code == 0 and f"succeeded; serving as {MODEL}:prices" in out, out
    job_id = out.split()[0]

    http = server.http()
    done = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert done["object"] == "fine_tuning.job" and done["status"] == "succeeded", done
    assert done["model"] == MODEL and done["suffix"] == "prices" and done["training_examples"] == 8
    assert done["hyperparameters"]["rank"] == 4 and done["hyperparameters"]["n_epochs"] == 1
    assert done["progress"] == 1.0 and done["step"] == done["total_steps"] == 2
    assert {"train_loss", "val_loss", "tokens_per_s"} <= set(done["metrics"])
    assert done["fine_tuned_model"] == f"{MODEL}:prices"
    listed = http.get("/v1/fine_tuning/jobs").json()
    assert listed["data"][0]["id"] == job_id and listed["counts"]["succeeded"] >= 1
    events = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    text = [e["message"] for e in events]
    assert text[0] == "succeeded" and text[-1].startswith("queued") and any("validation loss" in t for t in text)
    assert any(e["data"] and e["data"].get("scheduling") in ("SCHED_IDLE", "nice 19") for e in events)
    assert cli(["jobs", "--url", server.url]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and "succeeded" in listing and f"{MODEL}:prices" in listing
    assert cli(["jobs", "events", job_id, "--url", server.url]) == 0
    assert "validation loss" in capsys.readouterr().out

    # the server serves what it trained, under the suffix, through the OpenAI API
    reply = server.client().chat.completions.create(model=f"{MODEL}:prices", messages=question(FACTS[0][0]),
                                                    max_tokens=12, temperature=0)
    assert reply.model == f"{MODEL}:prices" and reply.choices[0].message.content

    # another tenant sees neither the job nor the adapter
    bob = server.http(server.create_key("bob"))
    assert bob.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 404
    assert bob.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert f"{MODEL}:prices" not in {m["id"] for m in bob.get("/v1/models").json()["data"]}


def test_job_yields_to_serving_pauses_resumes_and_cancels(server):
    """A running job's process is kept stopped while the server has requests and runs again
    once it is idle; a person pauses and resumes it; cancel kills it."""
    http = server.http()
    r = http.post("/v1/fine_tuning/jobs", json={"data": records(FACTS, TRAIN_Q), "suffix": "slow",
                                                "hyperparameters": {"n_epochs": 50, "rank": 2, "batch_size": 1}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["status"] in ("queued", "running")
    assert job["suffix"] == "slow" and job["training_examples"] == len(FACTS) and job["hyperparameters"]["rank"] == 2
    url = f"/v1/fine_tuning/jobs/{job['id']}"
    assert wait_for(lambda: http.get(url).json()["step"] >= 1, timeout=120, interval=0.2), http.get(url).json()
    pids = [p for p in os.listdir("/proc") if p.isdigit() and job["id"].encode() in _cmdline(p)]
    assert len(pids) == 1

    stream = LongStream(server)                  # serving is busy: the trainer is stopped
    try:
        stream.next_event()
        assert wait_for(lambda: _state(pids[0]) == "T", timeout=5), _state(pids[0])
        step = http.get(url).json()["step"]
        for _ in range(20):
            stream.next_event()
        assert http.get(url).json()["step"] <= step + 1
    finally:
        stream.close()
    assert wait_for(lambda: _state(pids[0]) in ("R", "S"), timeout=10), _state(pids[0])   # idle again: it runs

    r = http.post(f"{url}/pause")
    assert r.status_code == 200 and r.json()["status"] == "paused", r.text
    assert _state(pids[0]) == "T"
    time.sleep(0.5)
    assert _state(pids[0]) == "T" and http.post(f"{url}/pause").status_code == 409
    r = http.post(f"{url}/resume")
    assert r.status_code == 200 and r.json()["status"] == "running", r.text
    assert wait_for(lambda: _state(pids[0]) in ("R", "S"), timeout=5)

    r = http.post(f"{url}/cancel")
    assert r.status_code == 200, r.text
    done = wait_job(http, job["id"], timeout=30)
    assert done["status"] == "cancelled" and done["fine_tuned_model"] is None
    assert not Path(f"/proc/{pids[0]}").exists() or _state(pids[0]) == "Z"
    assert http.post(f"{url}/cancel").status_code == 409
    events = [e["message"] for e in http.get(f"{url}/events", params={"limit": 100}).json()["data"]]
    assert any(m.startswith("gave the CPU to serving") for m in events) and "paused" in events, events


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_job_api_refuses_bad_input(server):
    http = server.http()
    good = records(FACTS[:2], TRAIN_Q)
    cases = [
        ({"data": [good[0], {"messages": [{"role": "user", "content": "hi"}]}]},
         "data[1]: no assistant message to learn from"),
        ({"data": [good[0], "not an object"]}, "data[1]: expected a JSON object"),
        ({"data": []}, "data: no records"),
        ({}, "give exactly one of training_file"),
        ({"data": good, "training_file": "x.jsonl"}, "give exactly one of training_file"),
        ({"training_file": "nope.jsonl"}, "training_file: no file 'nope.jsonl' in your files"),
        ({"training_file": "../../etc/passwd"}, "training_file: path"),
        ({"data": good, "hyperparameters": {"rank": 0}}, "hyperparameters.rank"),
        ({"data": good, "hyperparameters": {"rank": 128}}, "more than this server serves (max_lora_rank 64)"),
        ({"data": good, "hyperparameters": {"max_len": 16}}, "data[0]: 39 tokens, more than max_len 16"),
        ({"data": good, "suffix": "no spaces allowed"}, "suffix"),
        ({"data": good, "model": "other-model"}, "model: 'other-model' is not served here"),
    ]
    for body, message in cases:
        r = http.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code in (400, 404), (body, r.text)
        assert message in r.json()["error"]["message"], (body, r.text)
    assert http.get("/v1/fine_tuning/jobs/ftjob-nothing").status_code == 404

    # a training file from the tenant's own files, with a bad line, is named by its line
    bad = "\n".join(json.dumps(r) for r in good) + "\n{oops\n"
    assert http.put("/v1/fs/train.jsonl", content=bad.encode()).status_code in (200, 201)
    r = http.post("/v1/fine_tuning/jobs", json={"training_file": "train.jsonl"})
    assert r.status_code == 400 and "training_file line 3: not valid JSON" in r.json()["error"]["message"], r.text


def test_trained_adapter_answers_learned_prices_over_http(server, trained):
    """The adapter trained above, loaded into a real server, answers the held-out phrasing
    through the OpenAI API with the prices it learned."""
    r = server.http().post("/v1/adapters", json={"name": "facts", "path": str(trained["out"])})
    assert r.status_code == 200, r.text
    client = server.client()

    def ask(name: str) -> str:
        return client.chat.completions.create(model=f"{MODEL}:facts", messages=question(name), max_tokens=16,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, [name for name, _ in FACTS]))
    served = accuracy(replies, FACTS)
    print(f"\nheld-out phrasing exact-match served over HTTP: {served:.2f}")
    assert served >= accuracy(trained["after"], FACTS) - 0.15, replies
