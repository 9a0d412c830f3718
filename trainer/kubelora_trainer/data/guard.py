"""The per-record size bound: records over ``data.maxRecordBytes`` are left out and counted.

Why a bound at all: rendering and tokenizing a record costs two orders of magnitude more memory than
its text (token strings, offsets and Python int lists; figures: docs/benchmarks.md), so one huge line
can take a pod past its memory limit before anything says why. A record longer than a few times what
``cutoffLen`` tokens can hold is mostly cut away anyway. JSONL lines over the bound are skipped while
streaming, without being held whole or parsed; records of other formats are measured after parsing,
before any rendering or tokenizing. Every skipped record is counted with where it was, for the run log
and summary.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: How many dropped records are named in the stats and the log line (the count is always complete).
NAMED = 3


def human_bytes(n: int) -> str:
    """1048576 -> '1 MiB', 65536 -> '64 KiB', 1000 -> '1000 bytes' (for one-line messages)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def record_bytes(record: dict[str, Any]) -> int:
    """Size of a parsed record as one JSONL line in UTF-8: the same measure the JSONL reader applies."""
    return len(json.dumps(record, ensure_ascii=False, default=str).encode("utf-8"))


@dataclass
class RecordGuard:
    """Counts the records dropped for being over ``limit`` bytes, naming the first few."""

    limit: int
    dropped: int = 0
    where: list[str] = field(default_factory=list)

    def drop(self, where: str) -> None:
        """Count one record over the limit at ``where`` (e.g. ``train.jsonl line 17``)."""
        self.dropped += 1
        if len(self.where) < NAMED:
            self.where.append(where)

    def keep(self, records: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
        """The records of ``source`` within the limit; the others are counted as dropped."""
        kept = []
        for i, rec in enumerate(records):
            if record_bytes(rec) > self.limit:
                self.drop(f"{source} record {i}")
            else:
                kept.append(rec)
        return kept

    def message(self) -> str:
        """``dropped 1 record over 1 MiB (train.jsonl line 17)``, or '' when nothing was dropped."""
        if not self.dropped:
            return ""
        noun = "record" if self.dropped == 1 else "records"
        more = ", ..." if self.dropped > len(self.where) else ""
        return (
            f"dropped {self.dropped} {noun} over {human_bytes(self.limit)} ({', '.join(self.where)}{more}); "
            "raise data.maxRecordBytes to keep them"
        )

    def stats(self) -> dict[str, Any]:
        """The counts for summary.json: how many, why, and where the first ones were."""
        return {"over_max_record_bytes": self.dropped, "max_record_bytes": self.limit, "first": list(self.where)}
