"""``make bench-cli``: how long ``mindspeed-cp groups`` and ``plan`` take at 4,096 to 1,048,576 ranks.

    python -m benchmarks.cli_scale                          # -> benchmarks/results/cli_scale.json, cli_scale.md
    python -m benchmarks.cli_scale --sizes 4096 16384 --timeout 60
    python -m benchmarks.cli_scale --src /tmp/old --name cli_scale_before   # another checkout's mindspeed_cp

Each command runs as a user runs it: a fresh ``python -m mindspeed_cp`` process (interpreter start-up and imports
included), its output written to a file. Reported: the child's CPU seconds (user + system: what other load on the
machine changes least), wall-clock seconds and peak resident memory. A command that runs past ``--timeout`` (wall)
is stopped and reported as "> timeout"; the larger sizes of that command are then skipped (they would take longer
still). Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [4096, 16384, 65536, 1048576]
LAYOUT = [
    "--tp",
    "8",
    "--cp",
    "16",
    "--cp-algo",
    "hybrid_cp_algo",
    "--ulysses-degree-in-cp",
    "4",
    "--cp-window-size",
    "2",
]
COMMANDS: Dict[str, List[str]] = {  # name -> arguments after `python -m mindspeed_cp`, W = the world size
    "groups --format json": ["groups", "--world-size", "W", *LAYOUT, "--format", "json"],
    "groups --format text": ["groups", "--world-size", "W", *LAYOUT, "--format", "text"],
    "plan (gpt3-30b, 128k tokens, h100)": [
        "plan",
        "--model",
        "gpt3-30b",
        "--seq-length",
        "131072",
        "--world-size",
        "W",
        "--device",
        "h100",
    ],
}


def run_one(argv: List[str], timeout: float, env: dict, cwd: str) -> dict:
    """Wall and CPU seconds and peak RSS (MiB) of one command, its stdout into a scratch file."""
    with tempfile.TemporaryFile() as sink:
        t0 = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "mindspeed_cp", *argv], stdout=sink, stderr=subprocess.PIPE, env=env, cwd=cwd
        )
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                child.kill()
                os.wait4(child.pid, 0)
                return {"seconds": None, "timeout": timeout}
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        err = child.stderr.read().decode()
        child.stderr.close()
        size = sink.tell()
    if child.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {child.returncode}: {err.strip()[-300:]}")
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "output_bytes": size,
    }


def measure(sizes: List[int], timeout: float, src: Optional[str]) -> List[dict]:
    env, cwd = dict(os.environ), src or ROOT  # `python -m` imports from its working folder first
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    rows = []
    for name, template in COMMANDS.items():
        stopped = False
        for world in sizes:
            argv = [str(world) if a == "W" else a for a in template]
            result = (
                {"seconds": None, "timeout": timeout, "skipped": True} if stopped else run_one(argv, timeout, env, cwd)
            )
            stopped = stopped or result["seconds"] is None
            rows.append(dict(command=name, world_size=world, argv=argv, **result))
            print(f"  {name:<38} {world:>9,} ranks: {_cell(rows[-1])}", flush=True)
    return rows


def _cell(row: dict) -> str:
    if row["seconds"] is None:
        return f"> {row['timeout']:.0f} s wall" + (" (not run)" if row.get("skipped") else "")
    return f"{row['cpu_seconds']:.1f} s ({row['seconds']:.1f} s wall), {row['peak_rss_mib']:.0f} MiB"


def markdown(rows: List[dict], title: str) -> str:
    sizes = sorted({r["world_size"] for r in rows})
    lines = [
        f"# {title}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average at the end {os.getloadavg()[0]:.1f}. A fresh `python -m mindspeed_cp` process per cell "
        "(start-up included): CPU seconds of the process (what load on the machine changes least), wall seconds, peak "
        "resident memory.",
        "",
        "| command | " + " | ".join(f"{w:,} ranks" for w in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in COMMANDS:
        cells = [_cell(next(r for r in rows if r["command"] == name and r["world_size"] == w)) for w in sizes]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cli_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per command (default 300)")
    p.add_argument("--src", default=None, help="a folder holding another mindspeed_cp to time (PYTHONPATH)")
    p.add_argument("--name", default="cli_scale", help="output file stem (default cli_scale)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    print(f"benchmarks.cli_scale: {', '.join(COMMANDS)} at {', '.join(f'{w:,}' for w in args.sizes)} ranks", flush=True)
    rows = measure(args.sizes, args.timeout, args.src)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    title = "mindspeed-cp groups / plan at cluster scale (benchmarks/cli_scale.py)" + (
        f" - {args.src}" if args.src else ""
    )
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, title))
    print(f"wrote {stem}.json, {stem}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
