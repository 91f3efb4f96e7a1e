"""LoRA adapters on the real default model: parity with transformers + PEFT, several
adapters and the base model in one batch, the prefix cache kept apart per adapter, GGUF
LoRA files, bad inputs, the adapter memory budget (LRU eviction, read-back), tenant
permission, and the OpenAI API (`model: "smollm2-135m:NAME"`) on a real server."""

from __future__ import annotations

import json
import re

import numpy as np
import openai
import pytest
import torch
from safetensors.torch import save_file

from conftest import GreedyReference, assert_matches_reference
from llmos import LLM, SamplingParams
from llmos.errors import InvalidRequestError, ModelLoadError
from llmos.kernel.adapters import (Adapter, AdapterBusy, AdapterMemoryFull, AdapterNotAllowed, AdapterTable,
                                   NoSuchAdapter)
from test_server import MODEL, ServerProcess

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (seed, LoraConfig arguments): every target, two attention ones, the MLP at two ranks
SPECS = {
    "all8": (1, dict(r=8, lora_alpha=16, target_modules=ALL)),
    "qv4": (2, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "mlp16": (3, dict(r=16, lora_alpha=16, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
                      rank_pattern={"down_proj": 8}, use_rslora=True)),
}
N = 8   # greedy tokens compared


def greedy(n: int = N) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def peft_model(loaded_default, tmp_path_factory):
    """transformers + PEFT with the three adapters (random init, fixed seeds), each saved by
    PEFT into its own directory. A copy of the model: the session reference stays clean."""
    import peft
    from llmos.models.loader import to_transformers
    root = tmp_path_factory.mktemp("adapters")
    model = to_transformers(loaded_default)
    pm = None
    for name, (seed, kw) in SPECS.items():
        torch.manual_seed(seed)
        cfg = peft.LoraConfig(init_lora_weights=False, **kw)
        if pm is None:
            pm = peft.get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    pm.save_pretrained(str(root))
    pm.eval()
    return pm, {name: root / name for name in SPECS}


@pytest.fixture(scope="module")
def llm(default_model_path):
    with LLM(MODEL, kv_cache_memory="96MiB", max_num_seqs=16) as llm:
        yield llm


@pytest.fixture(scope="module")
def loaded(llm, peft_model):
    _, dirs = peft_model
    for name, path in dirs.items():
        llm.load_adapter(name, str(path))
    return dirs


@pytest.fixture(scope="module")
def prompt(llm):
    return llm.get_tokenizer().encode("The old lighthouse keeper looked at the sea and said")


@pytest.fixture(scope="module")
def alone(llm, loaded, prompt):
    """The prompt's greedy tokens under the base model and each adapter, each run alone."""
    return {name: llm.generate(prompt, greedy(), adapter=name)[0].token_ids for name in [None, *SPECS]}


def reference(peft_model, name: str, ids: list[int], n: int = N) -> tuple[list[int], list[float]]:
    pm, _ = peft_model
    pm.set_adapter(name)
    return GreedyReference(pm)(ids, n)


def test_peft_adapter_gives_transformers_peft_tokens(llm, alone, peft_model, prompt):
    for name in SPECS:
        ref, gaps = reference(peft_model, name, prompt)
        assert_matches_reference(alone[name], ref, gaps)
        assert alone[name] != alone[None], f"adapter {name} changed nothing"
    info = {a.name: a for a in llm.list_adapters()}
    assert info["all8"].rank == 8 and info["all8"].targets == ALL and info["all8"].format == "peft"
    assert info["mlp16"].rank == 16 and info["qv4"].targets == ["q_proj", "v_proj"]


def test_mixed_batch_equals_each_alone(llm, alone, peft_model, prompt, greedy_reference):
    """Three adapters and the base model in one forward pass (admitted together, so the
    first step holds all four), two prompts each, give each one's tokens alone."""
    names = [None, *SPECS]
    prompts = [prompt, prompt[2:]]
    solo = {(n, 0): alone[n] for n in names} | {(n, 1): llm.generate(prompts[1], greedy(), adapter=n)[0].token_ids
                                                for n in names}
    with llm.loop.lock:   # nothing steps until all are queued
        handles = [(n, i, llm.submit(p, greedy(), adapter=n)) for n in names for i, p in enumerate(prompts)]
    for n, i, h in handles:
        got = h.result().token_ids
        ref, gaps = (greedy_reference(prompts[i], N) if n is None else reference(peft_model, n, prompts[i]))
        assert_matches_reference(got, ref, gaps)
        assert_matches_reference(solo[(n, i)], ref, gaps)
    assert set(llm.engine.runner.lora._stack_key) == set(SPECS)   # the batch ran grouped, all three at once


def test_prefix_cache_is_kept_apart_per_adapter(llm, loaded, peft_model):
    ids = llm.get_tokenizer().encode("Here is a long shared preamble about ships, storms, harbours and the "
                                     "people who keep the lights burning through the night, year after year, "
                                     "whatever the weather and whoever sails past: ")
    assert len(ids) > 2 * 16 + 1
    stats0 = llm.stats().prefix_cache
    first_base = llm.generate(ids, greedy(4))[0]
    under_a = llm.generate(ids, greedy(4), adapter="all8")[0]
    again_a = llm.generate(ids, greedy(4), adapter="all8")[0]
    under_b = llm.generate(ids, greedy(4), adapter="qv4")[0]
    again_base = llm.generate(ids, greedy(4))[0]
    assert first_base.metrics.num_cached_tokens == 0
    assert under_a.metrics.num_cached_tokens == 0, "KV computed for the base model was reused under an adapter"
    assert under_b.metrics.num_cached_tokens == 0, "KV computed under one adapter was reused under another"
    assert again_a.metrics.num_cached_tokens >= 32 and again_base.metrics.num_cached_tokens >= 32
    assert again_a.token_ids == under_a.token_ids and again_base.token_ids == first_base.token_ids
    ref, gaps = reference(peft_model, "all8", ids, 4)
    assert_matches_reference(under_a.token_ids, ref, gaps)
    hits = llm.stats().prefix_cache
    assert hits.hits - stats0.hits == (again_a.metrics.num_cached_tokens + again_base.metrics.num_cached_tokens) // 16


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf q/k row permutation (for a LoRA: B's rows)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_lora(peft_dir, out, cfg, alpha: float) -> None:
    """A GGUF LoRA laid out as llama.cpp's convert_lora_to_gguf writes one."""
    import gguf
    from safetensors import safe_open
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    with safe_open(str(peft_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in sorted(f.keys()):
            parts = key.split(".")          # base_model.model.model.layers.I.PARENT.TARGET.lora_X.weight
            layer, target, half = int(parts[4]), parts[6], parts[7][-1].lower()
            t = f.get_tensor(key).float()
            if half == "b" and target in ("q_proj", "k_proj"):
                t = _permute(t, cfg.num_heads if target == "q_proj" else cfg.num_kv_heads)
            w.add_tensor(f"blk.{layer}.{names[target]}.weight.lora_{half}", t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_lora_gives_the_peft_tokens(llm, loaded, alone, prompt, tmp_path):
    path = tmp_path / "all8.gguf"
    write_gguf_lora(loaded["all8"], path, llm.engine.model_config, alpha=16.0)
    info = llm.load_adapter("all8-gguf", str(path))
    try:
        assert info.format == "gguf" and info.rank == 8 and info.targets == ALL
        got = llm.generate(prompt, greedy(), adapter="all8-gguf")[0].token_ids
        assert got == alone["all8"]
    finally:
        llm.unload_adapter("all8-gguf")


def _peft_dir(path, tensors: dict, **config):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **config}))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _gguf_model(path):
    """A GGUF that is a model, not an adapter (general.type absent, as in model files)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_adapters_fail_clearly(llm, loaded, tmp_path, prompt):
    p = "base_model.model.model.layers.0.self_attn.q_proj."
    cases = [
        (tmp_path / "nowhere", "no such adapter file or directory"),
        (_peft_dir(tmp_path / "rank128", {p + "lora_A.weight": torch.zeros(128, 576),
                                          p + "lora_B.weight": torch.zeros(576, 128)}, r=128),
         "rank 128 is over the limit of 64"),
        (_peft_dir(tmp_path / "shape", {p + "lora_A.weight": torch.zeros(8, 100),
                                        p + "lora_B.weight": torch.zeros(576, 8)}),
         "do not fit the base model's q_proj (576 x 576)"),
        (_peft_dir(tmp_path / "head", {"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 576),
                                       "base_model.model.lm_head.lora_B.weight": torch.zeros(49152, 8)}),
         "unsupported target module lm_head"),
        (_peft_dir(tmp_path / "half", {p + "lora_A.weight": torch.zeros(8, 576)}), "has no lora_B tensor"),
        (_gguf_model(tmp_path / "model.gguf"), "not a LoRA adapter"),
    ]
    corrupt = _peft_dir(tmp_path / "corrupt", {p + "lora_A.weight": torch.zeros(8, 576),
                                               p + "lora_B.weight": torch.zeros(576, 8)})
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases.append((corrupt, "corrupt safetensors file"))
    noconfig = tmp_path / "noconfig"
    noconfig.mkdir()
    cases.append((noconfig, "no adapter_config.json"))
    for path, message in cases:
        with pytest.raises(ModelLoadError, match=re.escape(message)):
            llm.load_adapter("bad", str(path))
    assert "bad" not in {a.name for a in llm.list_adapters()}
    with pytest.raises(NoSuchAdapter, match="no adapter named 'nope'"):
        llm.generate(prompt, greedy(), adapter="nope")
    with pytest.raises(InvalidRequestError, match="adapter: a name is"):
        llm.load_adapter("has:colon", str(loaded["all8"]))
    with pytest.raises(InvalidRequestError, match="already loaded"):
        llm.load_adapter("all8", str(loaded["all8"]))


def test_adapter_table_evicts_least_recently_used_idle():
    t = AdapterTable(memory_budget=300, max_resident=3)

    def row(name: str, nbytes: int = 100) -> Adapter:
        return Adapter(name, f"/x/{name}", "peft", 8, 16.0, ("q_proj",), nbytes)

    for name in "abc":
        assert t.register(row(name)) == []
    t.acquire("a", "default", "r1")           # a is in use; b is now the least recently used idle one
    assert t.register(row("d")) == ["b"]
    assert [x.name for x in t.list() if not x.resident] == ["b"]
    assert t.reside("b", 100) == ["c"]         # reading b back evicts c (a is busy, d newer)
    t.acquire("b", "default", "r2")
    t.acquire("d", "default", "r3")
    with pytest.raises(AdapterMemoryFull):
        t.register(row("e"))                   # everything resident is in use
    with pytest.raises(InvalidRequestError, match="more than all of adapter_memory"):
        t.register(row("huge", 301))
    with pytest.raises(AdapterBusy):
        t.remove("a")
    t.release("a", "r1")
    t.remove("a")
    t.register(Adapter("private", "/x/p", "peft", 8, 16.0, ("q_proj",), 50, frozenset({"alice"})))
    with pytest.raises(AdapterNotAllowed):
        t.acquire("private", "bob", "r4")
    assert t.acquire("private", "alice", "r5").uid != t.find("b").uid


def test_budget_evicts_idle_adapters_and_reads_them_back(llm, loaded, alone, prompt):
    table = llm.engine.kernel.adapters
    old = table.max_resident
    table.max_resident = 2
    try:
        with llm.loop.lock:                    # an in-flight request holds mlp16 (steps wait)
            held = llm.submit(prompt, greedy(), adapter="mlp16")
            assert [r.adapter for r in llm.list_requests()] == ["mlp16"]
            llm.load_adapter("all8-again", str(loaded["all8"]))
            state = {a.name: a.resident for a in llm.list_adapters()}
            assert state["mlp16"] and state["all8-again"]            # in use / new: stay
            assert not state["all8"] and not state["qv4"]           # idle: evicted
            with pytest.raises(AdapterBusy):
                llm.unload_adapter("mlp16")
            held.cancel()
        reloaded = llm.generate(prompt, greedy(), adapter="qv4")[0].token_ids   # read back from its file
        assert reloaded == alone["qv4"]
        info = {a.name: a for a in llm.list_adapters()}
        assert info["qv4"].resident and info["qv4"].loads == 2
        assert table.num_resident <= 2 and table.used_bytes <= table.memory_budget
    finally:
        table.max_resident = old
        llm.unload_adapter("all8-again")


def test_tenant_permission(llm, loaded, alone, prompt):
    llm.load_adapter("alice-only", str(loaded["qv4"]), tenants=["alice"])
    try:
        with pytest.raises(AdapterNotAllowed, match="tenant 'bob' may not use adapter 'alice-only'"):
            llm.generate(prompt, greedy(), adapter="alice-only", tenant="bob")
        out = llm.generate(prompt, greedy(), adapter="alice-only", tenant="alice")[0]
        assert out.token_ids == alone["qv4"]
    finally:
        llm.unload_adapter("alice-only")


# -- HTTP: the OpenAI convention and /v1/adapters ---------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    s = ServerProcess(tmp_path_factory.mktemp("lora-server"))
    yield s
    assert s.stop() == 0, s.log.read_text()


def test_openai_model_names_an_adapter(server, llm, loaded):
    admin = server.http()
    r = admin.post("/v1/adapters", json={"name": "all8", "path": str(loaded["all8"])})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == f"{MODEL}:all8" and r.json()["rank"] == 8
    r = admin.post("/v1/adapters", json={"name": "qv4", "path": str(loaded["qv4"]), "tenants": ["alice"]})
    assert r.status_code == 200, r.text

    client = server.client()
    text = "Once upon a time"
    got = client.completions.create(model=f"{MODEL}:all8", prompt=text, max_tokens=8, temperature=0)
    want = llm.generate(text, SamplingParams(max_tokens=8, temperature=0.0), adapter="all8")[0].text
    assert got.choices[0].text == want and got.model == f"{MODEL}:all8"
    base = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0).choices[0].text
    assert base == llm.generate(text, SamplingParams(max_tokens=8, temperature=0.0))[0].text != want
    chat = client.chat.completions.create(model=f"{MODEL}:all8", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.content
    assert {f"{MODEL}:all8", f"{MODEL}:qv4"} <= {m.id for m in client.models.list()}

    bob, alice = server.create_key("bob"), server.create_key("alice")
    assert f"{MODEL}:qv4" not in {m.id for m in server.client(bob).models.list()}
    with pytest.raises(openai.PermissionDeniedError) as e:
        server.client(bob).completions.create(model=f"{MODEL}:qv4", prompt=text, max_tokens=2)
    assert e.value.body["code"] == "adapter_not_allowed"
    assert server.client(alice).completions.create(model=f"{MODEL}:qv4", prompt=text, max_tokens=2).choices
    for model, code in ((f"{MODEL}:nope", "adapter_not_found"), ("nope:all8", "model_not_found")):
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model=model, prompt=text, max_tokens=2)
        assert e.value.body["code"] == code
    r = server.http(bob).post("/v1/adapters", json={"name": "x", "path": str(loaded["qv4"])})
    assert r.status_code == 403
    r = admin.post("/v1/adapters", json={"name": "bad", "path": str(server.tmp / "missing")})
    assert r.status_code == 400 and "no such adapter" in r.json()["error"]["message"]


def test_cli_lists_loads_and_unloads(server, loaded, monkeypatch, capsys):
    from llmos.cli import main
    monkeypatch.setenv("LLMOS_URL", server.url)
    monkeypatch.setenv("LLMOS_API_KEY", server.admin_key)
    assert main(["adapters", "load", "mlp16", str(loaded["mlp16"])]) == 0
    assert f"loaded {MODEL}:mlp16" in capsys.readouterr().out
    assert main(["adapters", "list"]) == 0
    assert f"{MODEL}:mlp16" in capsys.readouterr().out
    assert main(["adapters", "unload", "mlp16"]) == 0
    assert f"unloaded {MODEL}:mlp16" in capsys.readouterr().out
    assert main(["adapters", "unload", "mlp16"]) == 1
    assert "no adapter named 'mlp16'" in capsys.readouterr().err


def test_batched_lora_math_matches_row_by_row():
    """LoraBank's grouped products equal each row's own x @ A @ B * scale, for one adapter
    on every row, adapters mixed with base rows, uneven groups, a kept stack reused for a
    subset of its adapters, and adapters of different ranks and targets."""
    from llmos.engine.lora import PROJECTIONS, LoraBank, LoraWeights
    from llmos.models.config import ModelConfig
    from llmos.models.lora_loader import LoraCheckpoint, LoraPair, target_shape
    cfg = ModelConfig("llama", 100, 32, 48, 2, 4, 2, 8)
    g = torch.Generator().manual_seed(0)

    def ckpt(rank: int, targets: list[str]) -> LoraCheckpoint:
        pairs = {}
        for layer in range(2):
            for t in targets:
                out, inp = target_shape(cfg, t)
                pairs[(layer, t)] = LoraPair(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g),
                                             0.5)
        return LoraCheckpoint(None, "peft", 1.0, pairs)

    ckpts = {"a": ckpt(4, ALL), "b": ckpt(2, ["q_proj", "v_proj"]), "c": ckpt(8, ["down_proj", "k_proj"])}
    bank = LoraBank(2)
    for n, c in ckpts.items():
        bank.add(n, LoraWeights(c, cfg, torch.device("cpu"), torch.float32))
    offsets = {"qkv": {"q_proj": 0, "k_proj": 32, "v_proj": 48}, "o": {"o_proj": 0},
               "gate_up": {"gate_proj": 0, "up_proj": 48}, "down": {"down_proj": 0}}

    def expected(layer: int, proj: str, x: torch.Tensor, names: list) -> torch.Tensor:
        out = torch.zeros(x.shape[0], sum(target_shape(cfg, t)[0] for t in PROJECTIONS[proj]))
        for row, name in enumerate(names):
            for t, c0 in offsets[proj].items():
                p = ckpts[name].pairs.get((layer, t)) if name else None
                if p is not None:
                    out[row, c0:c0 + p.b.shape[0]] = (x[row] @ p.a.t() @ p.b.t()) * p.scale
        return out

    keys = []
    for names in (["a"] * 5, ["a", None, "b", "b", "c", None], [None, "c", "c", "c", "a"], ["c", "a", "c"],
                  ["c", "c"], [None, None, "b"]):
        plan = bank.plan([(n, 1) for n in names], torch.device("cpu"))
        keys.append(bank._stack_key)
        for layer in range(2):
            for proj in PROJECTIONS:
                inp = 48 if proj == "down" else 32
                x = torch.randn(len(names), inp, generator=g)
                out = torch.zeros_like(expected(layer, proj, x, names))
                plan.add(layer, proj, x, out)
                torch.testing.assert_close(out, expected(layer, proj, x, names), rtol=1e-4, atol=1e-4)
    # a subset of at least half the kept stack reuses it; a smaller one gets its own
    assert keys[1:5] == [("a", "b", "c")] * 4 and keys[5] == ("b",)
    assert bank.plan([(None, 3)], torch.device("cpu")) is None
