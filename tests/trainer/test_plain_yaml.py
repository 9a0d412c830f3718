"""plain_yaml.py: what it writes reads back with `yaml.safe_load` (YAML 1.1) as the same data, for
the trainer configs the operator renders and for strings, keys and numbers a YAML reader takes for
something else; and it stays readable (plain where PyYAML would write plain)."""

from __future__ import annotations

import random
from typing import Any

import yaml
from kubelora_trainer import plain_yaml
from kubelora_trainer.config import dump_config, parse_config

AWKWARD = [
    "", " ", "a: b", "a:b", "a #c", "#h", "trailing ", " lead", "'q'", '"d"', "- d", "-", "?", ":", "x:",
    "null", "Null", "~", "yes", "No", "on", "OFF", "y", "true", "1e3", "1_000", "0x1F", "0o17", "017", "1:20",
    "2026-12-03", "2026-12-03T10:00:00Z", ".inf", "-.inf", ".nan", "1.5", "+1", "=", "<<", "*a", "&a", "!t",
    "%x", "@x", "`x", "{a}", "[a]", "a,b", "a\nb", "a\tb", "back\\slash", "üñíçødé", "emoji 😀", "\x85nel",
    "line\u2028sep", "del\x7f", "bom\ufeff", "nul\x00", "s3://b/x/y", "/output", "smollm2-135m", "q_proj",
    "x" * 300, "long words " * 40,
]


def round_trip(data: Any) -> Any:
    return yaml.safe_load(plain_yaml.dump(data))


def test_awkward_strings_keys_and_numbers_read_back_the_same() -> None:
    data = {
        "strings": AWKWARD,
        "keys": {s: i for i, s in enumerate(AWKWARD) if s},
        "numbers": [0, -1, 10**20, 0.0, -0.5, 1e-08, 2.5e-05, 1e16, 1.0e300, 3.0],
        "flags": [True, False, None],
        "empty": {"map": {}, "list": []},
        "records": [{"name": "a", "value": "1"}, {"name": "yes", "nested": {"k": ["x", {"deep": None}]}}],
        "lists": [["a", ["b", []], {"c": [1]}], [], [[None]]],
    }
    assert round_trip(data) == data
    special = round_trip({"v": [float("inf"), float("-inf"), float("nan")]})["v"]
    assert special[:2] == [float("inf"), float("-inf")] and special[2] != special[2]


def test_random_nested_data_reads_back_the_same() -> None:
    rng = random.Random(7)
    alphabet = "abc:#- '\"\\\n\t{}[],&*!|>%@`ü😀\x85\u2028\x7f0123456789.eE+_/"

    def value(depth: int) -> Any:
        kind = rng.randrange(7 if depth < 3 else 5)
        if kind == 0:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        if kind == 1:
            return rng.choice([rng.randrange(-1000, 1000), rng.uniform(-1e6, 1e6), rng.random() * 10 ** rng.randrange(-12, 12)])
        if kind == 2:
            return rng.choice([True, False, None])
        if kind in (3, 4):
            return rng.choice(AWKWARD)
        if kind == 5:
            return {str(value(3)): value(depth + 1) for _ in range(rng.randrange(4))}
        return [value(depth + 1) if rng.random() < 0.7 else {"k": value(depth + 1)} for _ in range(rng.randrange(4))]

    for _ in range(300):
        data = {str(value(3)): value(0) for _ in range(rng.randrange(1, 5))}
        assert round_trip(data) == data, plain_yaml.dump(data)


def test_configs_read_back_the_same_and_stay_readable() -> None:
    cfg = parse_config({
        "model": {"nameOrPath": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "data": {"path": "s3://bucket/data/train.jsonl", "fieldMap": {"instruction": "question"}},
        "lora": {"targetModules": ["q_proj", "v_proj"]},
        "training": {"learningRate": 2e-05, "saveMinutes": None},
    })
    text = dump_config(cfg)
    assert yaml.safe_load(text) == yaml.safe_load(yaml.safe_dump(yaml.safe_load(text)))
    assert parse_config(yaml.safe_load(text)) == cfg
    # Plain where PyYAML writes plain: what a person reads in `kubectl get configmap -o yaml`.
    for line in ("  nameOrPath: HuggingFaceTB/SmolLM2-135M-Instruct", "  path: s3://bucket/data/train.jsonl",
                 "  learningRate: 2.0e-05", "  saveMinutes: null", "  - q_proj", "    instruction: question"):
        assert line in text.splitlines(), (line, text)
