"""Markdown table of a ``ddfast bench`` JSON report (for the README): ``ddfast report FILE.json``."""
from __future__ import annotations

import json
from typing import Dict

from .runner import TABLE_COLUMNS, format_number, legends, table_cells


def markdown(report: Dict) -> str:
    rows = report["results"]
    cells = [table_cells(r) for r in rows]
    for c in cells:
        c["check"] = "error" if c["check"] == "ERROR" else c["check"]
    # columns nobody filled (e.g. peak MB on CPU, vs compiled without --compile-reference) are left out
    cols = [(t, k, f) for t, k, f in TABLE_COLUMNS
            if f is None or any(format_number(c.get(k), f, k) != "-" for c in cells)]
    lines = [f"Device: {report['device']} · torch {report['torch']} · commit {report['commit']} · "
             f"{report['date'][:10]} · `{report.get('command') or 'ddfast bench'}`", "",
             "| " + " | ".join(t.replace("host us", "host µs") for t, _, _ in cols) + " |",
             "|" + "|".join("---" if f is None else "---:" for _, _, f in cols) + "|"]
    for c in cells:
        values = [str(c.get(k, "–")) if f is None else format_number(c.get(k), f, k) for _, k, f in cols]
        values = ["–" if v == "-" else v for v in values]
        lines.append("| " + " | ".join(values) + " |")
    for legend in legends(rows):
        lines += ["", legend]
    if report.get("definitions"):
        lines += ["", "ops, syncs, host µs: see `definitions` in the JSON (one fwd+bwd call after warm-up)."]
    return "\n".join(lines)


def main(path: str) -> int:
    with open(path) as f:
        print(markdown(json.load(f)))
    return 0
