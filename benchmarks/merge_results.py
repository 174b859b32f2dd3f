"""Merges benchmark result files written by separate processes (e.g. one per core) into one.

    python benchmarks/merge_results.py benchmarks/results/allocation_cpu-2c.json /tmp/a.json /tmp/b.json

Every merged run keeps the command, commit and settings of the file it came from (`run["source"]`); a run of the
same method, setting and allocation already in the output is replaced, unless it is identical (an input made with
`--resume` from a copy of the output carries the old runs unchanged). The inputs must be the same benchmark.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

_KEYS = ("method", "setting", "allocation", "allocation_label", "label")


def _key(run: dict) -> tuple:
    return tuple(run.get(k) for k in _KEYS)


def merge(output: str, inputs: list[str]) -> dict:
    merged = json.load(open(output)) if os.path.exists(output) else None
    for path in inputs:
        data = json.load(open(path))
        if merged is None:
            merged = {**data, "runs": []}
        if data.get("benchmark") != merged.get("benchmark"):
            raise ValueError(f"{path}: benchmark {data.get('benchmark')!r}, expected {merged.get('benchmark')!r}.")
        source = {"command": data.get("command"), "git": data.get("git"), "settings": data.get("settings"),
                  "created": data.get("created")}
        existing = {_key(r): {k: v for k, v in r.items() if k != "source"} for r in merged["runs"]}
        new = [r for r in data["runs"] if existing.get(_key(r)) != r]  # runs copied over by --resume stay as they are
        fresh = {_key(r) for r in new}
        merged["runs"] = [r for r in merged["runs"] if _key(r) not in fresh]
        merged["runs"].extend({**run, "source": source} for run in new)
        merged.setdefault("merged_commands", []).append(data.get("command"))
    return merged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="Result file to extend (created if missing).")
    parser.add_argument("inputs", nargs="+", help="Result files to merge in.")
    args = parser.parse_args(argv)
    write_json(args.output, merge(args.output, args.inputs))


if __name__ == "__main__":
    main()
