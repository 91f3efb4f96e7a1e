"""Grammar-constrained decoding (llmos.engine.guided) on the default model: every output
parses and validates, whatever the sampling; bad specs are InvalidRequestError."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from llmos.engine.guided import compile_guide, text_or_json_spec
from llmos.errors import InvalidRequestError
from llmos.sampling_params import SamplingParams

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"], "additionalProperties": False},
    "email": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 30}]}},
    "required": ["name", "age", "tags", "address", "email"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(default_model_path):
    from llmos.api.llm import LLM
    llm = LLM(kv_cache_memory="128MiB")
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def tokenizer(llm):
    return llm.get_tokenizer()


def test_walking_a_valid_document_is_always_allowed(tokenizer):
    doc = {"name": "Ada", "age": 36, "tags": ["a", "c"], "address": {"zip": "12345"}, "email": None}
    guide = compile_guide({"json_schema": PERSON}, tokenizer).new_guide()
    for t in tokenizer.encode(json.dumps(doc), add_special_tokens=False):
        logits = torch.zeros(tokenizer.vocab_size)
        guide.mask_logits(logits)
        assert logits[t] == 0 and torch.isinf(logits).sum() > 0
        guide.accept(t)
        assert not guide.is_terminated()
    logits = torch.zeros(tokenizer.vocab_size)
    guide.mask_logits(logits)
    allowed = set(torch.nonzero(logits == 0).flatten().tolist())
    assert allowed == set(tokenizer.eos_token_ids)      # the object is complete: only end of text
    guide.accept(tokenizer.eos_token_ids[0])
    assert guide.is_terminated()


def test_compiled_specs_are_cached(tokenizer):
    a = compile_guide({"json_schema": PERSON}, tokenizer)
    b = compile_guide({"json_schema": json.loads(json.dumps(PERSON))}, tokenizer)
    assert a is b and a is not compile_guide({"json_object": True}, tokenizer)


@pytest.mark.parametrize("spec,field", [
    ({"json_schema": {"type": "objekt"}}, "json_schema"),
    ({"json_schema": "{not json"}, "json_schema"),
    ({"json_schema": {"properties": {"a": {"$ref": "#/nowhere"}}}}, "guided.json_schema"),
    ({"regex": "(unclosed"}, "guided.regex"),
    ({"regex": ""}, "guided.regex"),
    ({"grammar": "root ::= "}, "guided.grammar"),
    ({"grammar": "start: ("}, "guided.grammar"),
    ({"sql": "x"}, "guided"),
])
def test_bad_specs_are_invalid_requests(tokenizer, spec, field):
    with pytest.raises(InvalidRequestError, match=re.escape(field)):
        compile_guide(spec, tokenizer)


def test_bad_schema_fails_at_submit(llm):
    with pytest.raises(InvalidRequestError):
        llm.submit("x", SamplingParams(guided={"json_schema": {"type": 3}}))


def test_generated_json_validates_under_sampling(llm):
    params = [SamplingParams(max_tokens=120, temperature=t, top_p=p, seed=s, guided={"json_schema": PERSON})
              for s, (t, p) in enumerate([(0.0, 1.0), (1.0, 1.0), (1.5, 0.95), (1.0, 0.5)])]
    outs = llm.chat([[{"role": "user", "content": "Describe a person as JSON."}]] * len(params), params)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), PERSON)
    o = llm.generate("Some JSON:", SamplingParams(max_tokens=200, temperature=0.8, seed=1,
                                                  guided={"json_object": True}))[0]
    if o.finish_reason == "stop":
        assert isinstance(json.loads(o.text), dict)
    else:
        assert o.text.startswith("{")


def test_regex_and_grammars(llm):
    o = llm.generate("A US phone number:", SamplingParams(max_tokens=20, temperature=1.0, seed=3,
                                                          guided={"regex": r"\(\d{3}\) \d{3}-\d{4}"}))[0]
    assert o.finish_reason == "stop" and re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", o.text)
    ebnf = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{1,20} "."'
    o = llm.generate("Is the sky blue?", SamplingParams(max_tokens=30, guided={"grammar": ebnf}))[0]
    assert re.fullmatch(r"(yes|no) because [a-z ]{1,20}\.", o.text), o.text
    lark = 'start: "red" | "green" | "blue"'
    o = llm.generate("My favourite colour is", SamplingParams(max_tokens=5, guided={"grammar": lark}))[0]
    assert o.text in ("red", "green", "blue") and o.finish_reason == "stop"


def test_guided_request_ends_even_with_ignore_eos(llm):
    o = llm.generate("Pick:", SamplingParams(max_tokens=50, ignore_eos=True, guided={"regex": "(yes|no)"}))[0]
    assert o.text in ("yes", "no") and o.finish_reason == "stop"


def test_text_or_json_spec(llm, tokenizer):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    spec = text_or_json_spec(schema)
    for prompt in ("Say hello.", 'Reply with JSON like {"n": 4}.'):
        o = llm.chat([{"role": "user", "content": prompt}], SamplingParams(max_tokens=30, temperature=0,
                                                                          guided=spec))[0]
        if o.text.startswith("{"):
            jsonschema.validate(json.loads(o.text), schema)
        else:
            assert not o.text[:1].isspace()
    guide = compile_guide(spec, tokenizer).new_guide()
    for t in tokenizer.encode('{"n": 12}', add_special_tokens=False):
        guide.accept(t)
    logits = torch.zeros(tokenizer.vocab_size)
    guide.mask_logits(logits)
    assert set(torch.nonzero(logits == 0).flatten().tolist()) == set(tokenizer.eos_token_ids)
    with pytest.raises(InvalidRequestError):
        text_or_json_spec({"type": 7})


def test_unbounded_schema_fields_are_bounded_so_output_ends_as_json(llm):
    """The 135M model, asked for an integer with no bound, writes digits until max_tokens runs
    out; the grammar bounds digits and string lengths, so a sensible max_tokens ends in JSON."""
    schema = {"type": "object", "properties": {"year": {"type": "integer"}, "city": {"type": "string"}},
              "required": ["year", "city"], "additionalProperties": False}
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, guided={"json_schema": schema}) for s in range(6)]
    prompt = [{"role": "user", "content": "Write a very long number as the year, and a city."}]
    for out in llm.chat([prompt] * len(params), params):
        doc = json.loads(out.text)
        jsonschema.validate(doc, schema)
        assert abs(doc["year"]) < 10**15 and len(doc["city"]) <= 256
        assert out.finish_reason == "stop"


def test_json_bounds_leave_explicit_limits_alone():
    from llmos.engine.guided import JsonBounds
    schema = {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer", "maximum": 5}, "c": {"type": "string"},
        "d": {"type": "string", "maxLength": 3}, "e": {"enum": ["x"]}, "f": {"type": "array", "items": {"type": "number"}}}}
    bounded = JsonBounds(max_digits=3, max_string_length=10).apply(schema)
    props = bounded["properties"]
    assert (props["a"]["minimum"], props["a"]["maximum"]) == (-999, 999)
    assert props["b"] == {"type": "integer", "maximum": 5}
    assert props["c"]["maxLength"] == 10 and props["d"]["maxLength"] == 3 and props["e"] == {"enum": ["x"]}
    assert props["f"]["items"]["maximum"] == 999
    assert "minimum" not in schema["properties"]["a"], "the caller's schema is not changed"
