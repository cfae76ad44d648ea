"""How long the command line takes to answer ``--help`` and ``--version``, beside the cost it avoids.

Each command runs in a fresh interpreter (as a user's shell runs it), ``--repeat`` times; the table
gives the median and the slowest wall-clock seconds. The baseline row is what every ``--help`` paid
before the imports became lazy: loading the package's API (torch, timm, scipy, ...). A ``--ref``
checkout (e.g. the main branch) is measured too, with the same commands, when given.

    python bench/cli_startup.py [--repeat 5] [--ref /work/main]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, ROOT, machine_info, write_json

COMMANDS = {
    "ct-transfer --help": ["-m", "ct_transfer.cli", "--help"],
    "ct-transfer --version": ["-m", "ct_transfer.cli", "--version"],
    "ct-transfer train --help": ["-m", "ct_transfer.cli", "train", "--help"],
    "ct-transfer experiment --help": ["-m", "ct_transfer.cli", "experiment", "--help"],
    "baseline: import the API (torch, timm, ...)": ["-c", "import ct_transfer as ct; ct.fit; ct.load_run"],
}


def timed(src: Path, args: list[str], repeat: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
        out.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{args}: exit {proc.returncode}: {proc.stderr[-500:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ref", help="another checkout to measure the same way (its src/ is used)")
    args = ap.parse_args()
    checkouts = {"this": ROOT / "src"} | ({"ref": Path(args.ref) / "src"} if args.ref else {})
    rows = []
    for where, src in checkouts.items():
        for name, cmd in COMMANDS.items():
            if where == "ref" and "--version" in cmd:  # older checkouts have no --version
                continue
            times = timed(src, cmd, args.repeat)
            rows.append({"checkout": where, "command": name, "median_s": round(statistics.median(times), 3),
                         "max_s": round(max(times), 3), "runs": len(times)})
    print("| checkout | command | median s | max s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkout']} | {r['command']} | {r['median_s']:.2f} | {r['max_s']:.2f} |")
    path = RESULTS / "cli_startup.json"
    write_json(path, {"rows": rows, "machine": machine_info(), "ref": args.ref})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
