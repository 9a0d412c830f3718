"""Generate the bundled toy instruction set: short tasks whose answers can be checked exactly.

Why synthetic: the trainer must demonstrate a measurable before/after change (exact match on
held-out prompts) on a laptop in minutes, without downloading a dataset. Every task here has one
correct short answer, so exact match is meaningful, and the tasks are easy enough that a 135M
model learns the answer format within a few hundred steps.

Deterministic: ``python generate.py`` always writes the same train.jsonl and heldout.jsonl. The
held-out split shares no (instruction, input) pair with the training split.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

Example = dict[str, str]

# Word lists written as prose: easier to read and edit than 80 quoted strings.
WORDS = (  # noqa: SIM905
    "apple river stone cloud garden window pencil orange silver candle forest rabbit ocean mountain "
    "yellow paper bridge coffee button planet guitar summer winter spring autumn market castle dragon "
    "engine flower hammer island jacket kitten ladder mirror needle pepper rocket saddle tiger violin "
    "wagon basket cookie desert feather harbor jungle lemon meadow nickel pillow puzzle shadow spider "
    "tunnel velvet whistle anchor blanket camera dolphin falcon helmet lantern marble orchid parrot "
    "quartz ribbon sandal throne turtle umbrella walnut zebra copper bottle cotton"
).split()
ADJECTIVES = "red blue green quiet bright small large happy brave calm cold warm soft loud fast slow".split()  # noqa: SIM905


def _phrase(rng: random.Random, lo: int = 2, hi: int = 4) -> str:
    n = rng.randint(lo, hi)
    return " ".join([rng.choice(ADJECTIVES)] + rng.sample(WORDS, n - 1))


def uppercase(rng: random.Random) -> Example:
    text = _phrase(rng)
    instruction = rng.choice(
        [
            "Convert the following phrase to uppercase.",
            "Rewrite the text in capital letters.",
            "Make every letter uppercase.",
        ]
    )
    return {"instruction": instruction, "input": text, "output": text.upper()}


def sort_numbers(rng: random.Random) -> Example:
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    descending = rng.random() < 0.3
    order = "descending" if descending else "ascending"
    instruction = rng.choice([f"Sort these numbers in {order} order.", f"Arrange the numbers in {order} order."])
    return {
        "instruction": instruction,
        "input": ", ".join(map(str, nums)),
        "output": ", ".join(map(str, sorted(nums, reverse=descending))),
    }


def reverse_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 4))
    instruction = rng.choice(["Reverse the order of these words.", "Write these words in reverse order."])
    return {"instruction": instruction, "input": " ".join(words), "output": " ".join(reversed(words))}


def arithmetic(rng: random.Random) -> Example:
    op = rng.choice(["plus", "minus", "times"])
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        result = a * b
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if op == "minus" and b > a:
            a, b = b, a
        result = a + b if op == "plus" else a - b
    if rng.random() < 0.5:  # no input: the numbers are in the question
        return {"instruction": f"What is {a} {op} {b}?", "input": "", "output": str(result)}
    instruction = {
        "plus": "Add these two numbers.",
        "minus": "Subtract the second number from the first.",
        "times": "Multiply these two numbers.",
    }[op]
    return {"instruction": instruction, "input": f"{a} and {b}", "output": str(result)}


UNITS = [
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("meters", "centimeters", 100),
    ("days", "hours", 24),
]


def convert_units(rng: random.Random) -> Example:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 20)
    if rng.random() < 0.5:
        return {"instruction": f"How many {small} are in {n} {big}?", "input": "", "output": str(n * factor)}
    return {
        "instruction": f"Convert the quantity to {small}. Answer with the number only.",
        "input": f"{n} {big}",
        "output": str(n * factor),
    }


def count_words(rng: random.Random) -> Example:
    text = _phrase(rng, 2, 7)
    return {"instruction": "Count the words in this text.", "input": text, "output": str(len(text.split()))}


def first_letters(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {
        "instruction": "Write the first letter of each word, joined together.",
        "input": " ".join(words),
        "output": "".join(w[0] for w in words),
    }


def last_word(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {"instruction": f"What is the last word in: {' '.join(words)}?", "input": "", "output": words[-1]}


def larger_number(rng: random.Random) -> Example:
    a, b = rng.sample(range(1, 1000), 2)
    return {"instruction": f"Which number is larger, {a} or {b}?", "input": "", "output": str(max(a, b))}


TASKS: list[Callable[[random.Random], Example]] = [
    uppercase,
    sort_numbers,
    reverse_words,
    arithmetic,
    convert_units,
    count_words,
    first_letters,
    last_word,
    larger_number,
]


def generate(n_train: int = 2000, n_heldout: int = 200, seed: int = 1234) -> tuple[list[Example], list[Example]]:
    """Unique examples, tasks in round-robin so both splits cover every task evenly."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    examples: list[Example] = []
    i = 0
    while len(examples) < n_train + n_heldout:
        ex = TASKS[i % len(TASKS)](rng)
        i += 1
        key = (ex["instruction"], ex["input"])
        if key in seen:
            continue
        seen.add(key)
        examples.append(ex)
    rng.shuffle(examples)
    return examples[n_heldout:], examples[:n_heldout]


def _write(path: Path, rows: list[Example]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in ("instruction", "input", "output")}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Write train.jsonl and heldout.jsonl (next to this script unless --out is given)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    train, heldout = generate(args.train, args.heldout, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "train.jsonl", train)
    _write(args.out / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out examples to {args.out}")


if __name__ == "__main__":
    main()
