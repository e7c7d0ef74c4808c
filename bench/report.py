"""Markdown table of a ``ddfast bench`` JSON report (for the README): ``ddfast report FILE.json``."""
from __future__ import annotations

import json
from typing import Dict


def markdown(report: Dict) -> str:
    lines = [f"Device: {report['device']} · torch {report['torch']} · commit {report['commit']} · "
             f"{report['date'][:10]} · `{report.get('command') or 'ddfast bench'}`", "",
             "| case | provider | check | median ms | speed-up | GB/s | peak MB |",
             "|---|---|---|---:|---:|---:|---:|"]

    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "–"

    for r in report["results"]:
        check = "error" if "error" in r else r.get("check", "–")
        lines.append(f"| {r['case']} | {r['provider']} | {check} | {num(r.get('median_ms'), '.3f')} | "
                     f"{num(r.get('speedup'), '.2f')}{'x' if r.get('speedup') else ''} | {num(r.get('gbs'), '.1f')} | "
                     f"{num(r.get('peak_mem_mb'), '.1f')} |")
    return "\n".join(lines)


def main(path: str) -> int:
    with open(path) as f:
        print(markdown(json.load(f)))
    return 0
