"""The fault table: one JSON line per scenario run, and ``python -m tests.faults.report`` to print it.

Each fault test appends a line to ``$OUTBOX_FAULT_REPORT`` (default
``.pytest_cache/outbox-fault-report.jsonl`` in the checkout). The command prints the latest
run of every scenario as a Markdown table (``--all`` prints every run; ``--path`` reads
another file).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
COLUMNS = ("scenario", "committed", "rolled_back_txns", "events", "lost", "rolled_back", "duplicated", "order_violations",
           "recover_s", "notes")
HEADINGS = ("scenario", "txns committed", "txns rolled back", "events committed", "lost", "rolled-back published", "duplicated",
            "order violations", "time to recover (s)", "notes")


def report_path() -> Path:
    return Path(os.environ.get("OUTBOX_FAULT_REPORT") or ROOT / ".pytest_cache" / "outbox-fault-report.jsonl")


def append(entry: dict[str, Any], path: Path | None = None) -> None:
    path = path or report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}) + "\n")


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last entry of each scenario, in the order scenarios first appeared."""
    last: dict[str, dict[str, Any]] = {}
    for e in entries:
        last.pop(e["scenario"], None)
        last[e["scenario"]] = e
    return list(last.values())


def table(entries: Sequence[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(HEADINGS) + " |", "|" + "---|" * len(HEADINGS)]
    lines += ["| " + " | ".join(cell(e.get(c)) for c in COLUMNS) + " |" for e in entries]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.faults.report", description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=None, help=f"report file [default: {report_path()}]")
    parser.add_argument("--all", action="store_true", help="every run, not only the latest of each scenario")
    args = parser.parse_args(argv)
    path = args.path or report_path()
    entries = load(path)
    if not entries:
        print(f"no fault runs recorded in {path}: run 'pytest tests/faults' first", file=sys.stderr)
        return 1
    print(table(entries if args.all else latest(entries)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
