"""Block-style YAML for plain data (dicts, lists, str, int, float, bool, None), written directly.

Why not `yaml.dump`: the operator renders a trainer config for every start (`config.dump_config`),
and PyYAML's representer, which builds a node graph in Python before libyaml emits it, was 14% of
the operator's CPU (holding the GIL) in a burst of 1,000 starts; this writer takes an eighth of its
time (92 us against 741 us for a typical config, the same text; docs/operator-benchmark.md, "sixth
round"). What it writes reads back with `yaml.safe_load` (YAML 1.1) as the same data:
tests/trainer/test_plain_yaml.py checks that on configs, awkward strings and random nested data.

Rules: keys and strings are written plain when they look like nothing else to a YAML 1.1 reader
(PyYAML's own resolver decides: "yes", "1e3", "2026-12-03", "null" and the like get quotes), else
as JSON strings, which are YAML double-quoted scalars; floats as PyYAML writes them (a dot in the
mantissa, which YAML 1.1 needs to read `1.0e-08` as a number); empty collections as `{}` and `[]`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import yaml

#: Characters a plain scalar may consist of here (a subset of YAML's, conservative on purpose): no
#: ": ", " #", flow indicators, quotes or leading indicators are possible with these.
_PLAIN = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./:+@=-]*\Z")
_RESOLVER = yaml.resolver.Resolver()
_STR_TAG = "tag:yaml.org,2002:str"
#: What must be escaped inside a double-quoted scalar beyond what JSON escapes: characters PyYAML's
#: reader refuses raw, and the line breaks YAML 1.1 knows besides \n and \r (folded to a space raw).
_ESCAPE = re.compile("[^\x09\x0a\x0d\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]|[\u2028\u2029]")


def dump(data: Mapping[str, Any]) -> str:
    """`data` as a block-style YAML document (keys in insertion order)."""
    lines: list[str] = []
    _mapping(data, "", lines)
    return "\n".join(lines) + "\n" if lines else "{}\n"


def _mapping(data: Mapping[str, Any], indent: str, lines: list[str]) -> None:
    for key, value in data.items():
        head = f"{indent}{_string(str(key))}:"
        if isinstance(value, Mapping) and value:
            lines.append(head)
            _mapping(value, indent + "  ", lines)
        elif isinstance(value, (list, tuple)) and value:
            lines.append(head)
            _sequence(value, indent, lines)
        else:
            lines.append(f"{head} {_scalar(value)}")


def _sequence(items: list[Any] | tuple[Any, ...], indent: str, lines: list[str]) -> None:
    """Items at the key's own indent (PyYAML's default style)."""
    for item in items:
        nested: list[str] = []
        if isinstance(item, Mapping) and item:
            _mapping(item, indent + "  ", nested)
        elif isinstance(item, (list, tuple)) and item:
            _sequence(item, indent + "  ", nested)
        if nested:  # the item's first line after its "- ", the rest below it
            nested[0] = f"{indent}- {nested[0][len(indent) + 2:]}"
            lines.extend(nested)
        else:
            lines.append(f"{indent}- {_scalar(item)}")


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value).lower()
        if "." not in text and "e" in text:  # 1e-08 -> 1.0e-08: YAML 1.1 reads the former as a string
            text = text.replace("e", ".0e", 1)
        return text
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, (list, tuple)):
        return "[]"
    raise TypeError(f"plain_yaml: cannot write {type(value).__name__}")


@functools.lru_cache(maxsize=4096)
def _string(text: str) -> str:
    """Plain when a YAML 1.1 reader reads it back as this same string, else a JSON string.
    Remembered: every config has the same keys and mostly the same values."""
    plain = _PLAIN.match(text) and not text.endswith(":")
    if plain and _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) == _STR_TAG:
        return text
    quoted = json.dumps(text, ensure_ascii=False)  # astral characters raw: JSON's surrogate pairs are not YAML's
    return _ESCAPE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)
