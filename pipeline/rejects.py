"""The rejects table: every input that is not accepted, with the stage and a human-readable reason."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

REJECT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # where the input came from (relative path, shard/key, log file:row)
        ("stage", pa.string()),  # ingest, faces, social, ...
        ("reason", pa.string()),  # short machine-groupable reason, e.g. "truncated image"
        ("detail", pa.string()),  # longer human-readable explanation
        ("partition", pa.string()),
        ("uid", pa.string()),  # content uid when the bytes could be read
    ]
)


@dataclass
class Rejects:
    stage: str
    partition: str = ""
    rows: list[dict] = field(default_factory=list)

    def add(self, source: str, reason: str, detail: str = "", uid: str | None = None) -> None:
        self.rows.append(
            {
                "source": source,
                "stage": self.stage,
                "reason": reason,
                "detail": detail,
                "partition": self.partition,
                "uid": uid,
            }
        )

    def __len__(self) -> int:
        return len(self.rows)

    def to_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=REJECT_SCHEMA)

    def counts_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["reason"]] = out.get(r["reason"], 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
