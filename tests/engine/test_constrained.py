"""Structured generation on the built-in tiny model: its weights are random, so the grammar does all
the work, and its byte-level vocabulary can spell any output. Outputs are checked with jsonschema
and re."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from llmosd.engine import Engine, EngineConfig, InvalidRequest, Request, TokenEvent

SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 1, "maxItems": 5},
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}, "ok": {"type": "boolean"}},
        "required": ["tags", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": {"type": ["string", "null"], "maxLength": 8},
        },
        "required": ["point"],
        "additionalProperties": False,
    },
    {"anyOf": [{"type": "string", "pattern": "^[a-z]{2,6}$"}, {"type": "integer", "minimum": 0, "maximum": 999}]},
]


@pytest.fixture(scope="module")
def engine():
    engine = Engine(EngineConfig(model="tiny", kv_memory_bytes=32 << 20, max_batch=200, max_step_tokens=8192))
    engine.start()
    yield engine
    engine.stop()


def test_200_of_200_constrained_outputs_parse_and_validate(engine: Engine) -> None:
    """Sampled at temperature 1 (seeded) over five schemas, all in flight at once."""
    handles = [
        (SCHEMAS[i % len(SCHEMAS)], engine.submit(Request(
            prompt=f"Request {i}: answer in JSON.", json_schema=SCHEMAS[i % len(SCHEMAS)], max_tokens=200,
            temperature=1.0, seed=i,
        )))
        for i in range(200)
    ]
    results = [(schema, handle.result(timeout=600)) for schema, handle in handles]
    assert [r.finish_reason for _, r in results] == ["stop"] * 200
    for schema, result in results:
        jsonschema.validate(json.loads(result.text), schema)
    assert engine.stats()["kv_blocks_used"] == 0


def test_constrained_and_free_requests_share_steps() -> None:
    """One batch holds both kinds; the free request's greedy tokens are those it gets alone."""
    engine = Engine(EngineConfig(model="tiny", kv_memory_bytes=8 << 20))
    free = Request(prompt="free text", max_tokens=40, ignore_eos=True)
    alone = engine.generate(free).token_ids
    steps: dict[str, set[int]] = {"free": set(), "constrained": set()}

    def record(kind: str):
        return lambda e: steps[kind].add(engine.steps) if isinstance(e, TokenEvent) else None

    schema = {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999}, "minItems": 4, "maxItems": 4}
    constrained = engine.submit(Request(prompt="json", json_schema=schema, max_tokens=40, temperature=1.0, seed=3), record("constrained"))
    mixed = engine.submit(free, record("free"))
    for _ in range(10):
        engine.step()
    assert len(steps["free"] & steps["constrained"]) == 10
    assert mixed.result().token_ids == alone
    assert constrained.result().finish_reason == "stop" and len(json.loads(constrained.result().text)) == 4


@pytest.mark.parametrize(
    "constraint, matches",
    [
        (dict(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (dict(grammar='root ::= "yes" | "no" | "maybe " [0-9]'), lambda t: re.fullmatch(r"yes|no|maybe [0-9]", t)),
        (dict(grammar='start: "(" start ")" | "x"'), lambda t: re.fullmatch(r"(\(*)x(\)*)", t) and t.count("(") == t.count(")")),
    ],
    ids=["regex", "gbnf", "lark"],
)
def test_regex_and_grammar_outputs_match(engine: Engine, constraint: dict, matches) -> None:
    for seed in range(8):
        result = engine.generate(Request(prompt="answer:", max_tokens=60, temperature=1.0, seed=seed, **constraint))
        assert result.finish_reason == "stop" and matches(result.text), result.text


def test_grammar_that_allows_nothing_more_ends_without_eos(engine: Engine) -> None:
    result = engine.generate(Request(prompt="say it", regex="abc", max_tokens=20))
    assert (result.text, result.finish_reason, len(result.token_ids)) == ("abc", "stop", 3)
    assert not set(result.token_ids) & engine.eos_token_ids


def test_max_tokens_cut_is_visible_as_length(engine: Engine) -> None:
    schema = SCHEMAS[0]
    result = engine.generate(Request(prompt="JSON:", json_schema=schema, max_tokens=6))
    assert result.finish_reason == "length" and len(result.token_ids) == 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(json_schema={"type": "objectx"}), "json_schema: .*objectx"),
        (dict(json_schema="{not json"), "json_schema: Expecting property name"),
        (dict(json_schema=[1, 2]), "json_schema must be a JSON object"),
        (dict(regex="(unclosed"), "(?s)regex: .*unclosed group"),
        (dict(regex=""), "regex must be non-empty text"),
        (dict(grammar="root ::= missing"), "(?s)grammar: .*missing"),
        (dict(grammar="start: undefined_rule"), "(?s)grammar: .*undefined_rule"),
        (dict(json_schema={"type": "object"}, regex="a"), "at most one constraint"),
        (dict(json_schema={"type": "object"}, stop=["}"]), "no stop strings"),
        (dict(regex="a+", ignore_eos=True), "no ignore_eos"),
    ],
)
def test_bad_constraints_are_refused_with_the_library_message(engine: Engine, bad: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        engine.submit(Request(prompt="x", max_tokens=8, **bad))
    assert engine.generate(Request(prompt="still serving", regex="ok", max_tokens=8)).text == "ok"
