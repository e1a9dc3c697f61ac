"""Run every benchmark in ``bench/`` in turn and print their figures (``just bench``).

Each benchmark is a module ``bench/<name>.py`` runnable as ``python -m bench.<name>``; they
run one after another (never in parallel: they measure the machine) as subprocesses, their
output streamed, then a summary of every line that states a bar. Modules whose name starts
with ``_`` are helpers; ``soak`` (a long stability run, 30 min by default) and
``catchup_profile`` (a diagnosis, not a benchmark) only run when named with ``--only``.

``--quick`` runs small sizes: ``--quick`` is passed to benchmarks that accept it; the others
get their small-size options (see ``QUICK_FALLBACK``) when they have them.

Usage: ``python -m bench [--quick] [--only NAME ...] [--skip NAME ...] [--list]``.
Exit 0 when every benchmark ran and met its bars.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("writer", "catchup", "latency", "idle")  # the rest follow alphabetically
OPT_IN = frozenset({"soak", "catchup_profile"})
QUICK_FALLBACK: dict[str, list[list[str]]] = {
    # option groups passed under --quick to benchmarks without a --quick of their own;
    # a group is passed only when the benchmark's --help shows its option
    "writer": [["--events", "5000"], ["--repeat", "1"], ["--latency-writes", "200"]],
    "soak": [["--minutes", "1"], ["--interval", "10"]],
}
_BAR_LINE = re.compile(r"\bbar\b|\(bar:", re.IGNORECASE)


def discover() -> list[str]:
    names = sorted(
        p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_") and p.stem != "__main__"
    )
    first = [n for n in ORDER if n in names]
    return first + [n for n in names if n not in first]


def _help(name: str) -> str:
    try:
        out = subprocess.run(
            [sys.executable, "-m", f"bench.{name}", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=HERE.parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout


def quick_args(name: str) -> list[str]:
    text = _help(name)
    if re.search(r"--quick\b", text):
        return ["--quick"]
    args: list[str] = []
    for group in QUICK_FALLBACK.get(name, []):
        if re.search(re.escape(group[0]) + r"\b", text):
            args += group
    return args


def run_one(name: str, args: list[str]) -> tuple[int, float, list[str]]:
    """Run ``python -m bench.<name> args``, streaming its output; (exit, seconds, bar lines)."""
    cmd = [sys.executable, "-m", f"bench.{name}", *args]
    bars: list[str] = []
    t0 = time.monotonic()
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        cwd=HERE.parent,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if _BAR_LINE.search(line):
                bars.append(line.rstrip())
        code = proc.wait()
    return code, time.monotonic() - t0, bars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these")
    parser.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="skip these")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)

    available = discover()
    if args.list:
        for name in available:
            print(name + ("  (opt-in: --only)" if name in OPT_IN else ""))
        return 0
    if args.only:
        unknown = [n for n in args.only if n not in available]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {available}")
        selected = [n for n in available if n in args.only]
    else:
        selected = [n for n in available if n not in OPT_IN]
    selected = [n for n in selected if n not in args.skip]

    results: list[tuple[str, int, float, list[str]]] = []
    for name in selected:
        extra = quick_args(name) if args.quick else []
        banner = f" bench.{name} {' '.join(extra)}".rstrip() + " "
        print(f"\n{banner:=^100}", flush=True)
        try:
            code, seconds, bars = run_one(name, extra)
        except KeyboardInterrupt:
            print(f"\ninterrupted during bench.{name}")
            return 130
        results.append((name, code, seconds, bars))

    print(f"\n{' summary ':=^100}")
    for name, code, seconds, bars in results:
        state = "ok (bars met)" if code == 0 else f"exit {code} (bar missed or failed)"
        print(f"bench.{name:<10} {seconds:7.1f} s  {state}")
        for line in bars:
            print(f"    {line.strip()}")
    return 0 if all(code == 0 for _n, code, _s, _b in results) else 1


if __name__ == "__main__":
    sys.exit(main())
