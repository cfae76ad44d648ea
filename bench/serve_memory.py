"""Resident memory of a real ``ct-transfer serve`` process under the hostile uploads of issue #22.

For each case: the server's RSS before (after start-up and one warm-up request with a Grad-CAM
overlay), its peak during the case (VmHWM from /proc/PID/status, reset before each case through
/proc/PID/clear_refs), the HTTP statuses and the wall time. Compared in the same run with the bound
that docs/serve.md states (tests/serving.py: MEMORY_BOUND_MB) and, with ``--compare-src``, with
another checkout's server (e.g. the code before the budgets: ``--compare-src /path/to/old/src``),
on the one-client cases only (an unbounded server takes GB per client).

    PYTHONPATH=src python bench/serve_memory.py --run runs/lite0 [--compare-src OLD/src]

Prints a table; writes bench/results/serve_memory.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serving: the tests' own harness

from _common import DATA, RESULTS, machine_info, write_json  # noqa: E402

from tests.serving import (MEMORY_BOUND_MB, memory_mb, post, reset_peak, serve_process,  # noqa: E402
                           zero_png, zero_zip)


def cases(slices: list[tuple[str, bytes]]) -> list[tuple[str, int, list]]:
    """(name, concurrent clients, files of each request)."""
    png, bomb, hundred = zero_png(6300), zero_zip(400), zero_zip(100)
    return [
        ("6300x6300 zero PNG (38 KB) x1, overlay", 1, [("zero.png", png)]),
        ("6300x6300 zero PNG x3 in one request", 1, [(f"zero{i}.png", png) for i in range(3)]),
        ("3 clients at once, each 6300x6300 PNG x3", 3, [(f"zero{i}.png", png) for i in range(3)]),
        ("3 zips of 400 MB zeros (0.4 MB each)", 1, [(f"bomb{i}.zip", bomb) for i in range(3)]),
        ("3 zips of 100 MB zeros (request total 300 MB)", 1, [(f"z{i}.zip", hundred) for i in range(3)]),
        ("3 clients at once, each 3 zips of 400 MB", 3, [(f"bomb{i}.zip", bomb) for i in range(3)]),
        (f"{len(slices)} dataset slices, overlay (legitimate)", 1, slices),
    ]


def measure(url: str, pid: int, name: str, clients: int, files) -> dict:
    reset_ok = reset_peak(pid)
    before = memory_mb(pid)["rss"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        responses = list(pool.map(lambda _: post(url, files, timeout=900), range(clients)))
    wall = time.perf_counter() - t0
    mem = memory_mb(pid)
    return {"case": name, "clients": clients, "statuses": [r.status_code for r in responses],
            "rss_before_mb": round(before, 1), "peak_mb": round(mem["peak"], 1),
            "rise_mb": round(mem["peak"] - before, 1), "rss_after_mb": round(mem["rss"], 1),
            "peak_reset": reset_ok, "wall_s": round(wall, 2),
            "detail": (responses[0].json().get("detail") if responses[0].status_code != 200 else None)}


def run_server(label: str, run: Path, src: Path | None, slices, tmp: Path) -> list[dict]:
    rows = []
    with serve_process([run], log_path=tmp / f"{label}.log", src=src) as server:
        url, pid = server["url"], server["proc"].pid
        assert post(url, slices[:1]).status_code == 200  # warm-up: Grad-CAM imported, first batch done
        loaded = memory_mb(pid)["rss"]
        for name, clients, files in cases(slices):
            if label != "this" and clients > 1:
                continue  # an unbounded server could take several GB per client on a shared machine
            row = measure(url, pid, name, clients, files)
            row.update(server=label, loaded_rss_mb=round(loaded, 1), rise_over_loaded_mb=round(row["peak_mb"] - loaded, 1))
            rows.append(row)
            print(f"{label:8} {name:48} {str(row['statuses']):16} peak {row['peak_mb']:7.0f} MB "
                  f"(+{row['rise_over_loaded_mb']:5.0f} over loaded {loaded:5.0f}) {row['wall_s']:7.1f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a run directory to serve")
    parser.add_argument("--compare-src", type=Path, help="another checkout's src/ to measure the same way")
    parser.add_argument("--slices", type=int, default=40, help="dataset slices in the legitimate case")
    args = parser.parse_args()
    files = sorted((DATA / "COVID").iterdir())[:args.slices // 2] + sorted((DATA / "non-COVID").iterdir())[:args.slices // 2]
    slices = [(p.name, p.read_bytes()) for p in files]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += run_server("this", args.run, None, slices, Path(tmp))
        if args.compare_src:
            rows += run_server("compare", args.run, args.compare_src, slices, Path(tmp))
    worst = max(r["rise_over_loaded_mb"] for r in rows if r["server"] == "this")
    print(f"\nstated bound: peak <= loaded + {MEMORY_BOUND_MB} MB; worst case here: +{worst:.0f} MB "
          f"({'within' if worst <= MEMORY_BOUND_MB else 'ABOVE'} the bound)")
    write_json(RESULTS / "serve_memory.json", {"machine": machine_info(), "bound_mb": MEMORY_BOUND_MB,
                                               "worst_rise_mb": worst, "rows": rows})


if __name__ == "__main__":
    main()
