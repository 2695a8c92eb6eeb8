"""Soak run: many samples through `Runtime.run` in a loop and through `jei-edge-run` on a stdin
stream; resident memory and open file descriptors sampled along the way must stay flat.

    python benchmarks/soak.py [--bundle runs/demo/model.jei] [--samples 100000] [--batch 64]

Uses the quickstart bundle (`make demo` builds it; built here from runs/demo/model.pt when only
the checkpoint exists). Inputs are random raw values in [0, 1]. Writes
``benchmarks/results/soak.{json,md}`` with the command, commit and machine. RSS is read from
/proc (Linux); "growth" is the last sample minus the first sample after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.realized_speedup import machine  # noqa: E402
from jei_edge.runtime import Runtime  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib(pid: int = 0) -> float:
    statm = Path(f"/proc/{pid or os.getpid()}/statm").read_text().split()
    return int(statm[1]) * PAGE / 2**20


def fds(pid: int = 0) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def _summary(trace):
    rss = [r for _, r, _ in trace]
    fd = [f for _, _, f in trace]
    return {"samples_at": [s for s, _, _ in trace], "rss_mib": [round(r, 2) for r in rss], "fds": fd,
            "rss_first_mib": round(rss[0], 2), "rss_last_mib": round(rss[-1], 2), "rss_max_mib": round(max(rss), 2),
            "rss_growth_mib": round(rss[-1] - rss[0], 2), "fd_first": fd[0], "fd_last": fd[-1], "fd_max": max(fd)}


def soak_runtime(bundle: Path, samples: int, batch: int, points: int = 20) -> dict:
    rng = np.random.default_rng(0)
    with Runtime.load(bundle) as rt:
        shape = (batch, *rt.input_shape)
        x = rng.uniform(size=shape).astype(np.float32)
        for _ in range(20):  # warm-up: allocators, sessions, caches
            rt.run(x)
        trace, done, every = [], 0, max(1, samples // points)
        t0 = time.perf_counter()
        while done < samples:
            rt.run(rng.uniform(size=shape).astype(np.float32))
            done += batch
            if not trace or done - trace[-1][0] >= every:
                trace.append((done, rss_mib(), fds()))
        seconds = time.perf_counter() - t0
    return {"samples": done, "batch": batch, "seconds": round(seconds, 1), **_summary(trace)}


def soak_stream(bundle: Path, samples: int, batch: int, points: int = 20) -> dict:
    """`jei-edge-run BUNDLE -` fed ``samples`` raw inputs as .npy arrays of ``batch`` rows."""
    import io

    with Runtime.load(bundle) as rt:
        shape = (batch, *rt.input_shape)
    proc = subprocess.Popen([sys.executable, "-m", "jei_edge.runtime.cli", str(bundle), "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    lines = [0]

    def drain():
        for _ in proc.stdout:
            lines[0] += 1

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    rng = np.random.default_rng(1)
    trace, sent, every, warm = [], 0, max(1, samples // points), 20 * batch
    t0 = time.perf_counter()
    while sent < samples + warm:
        buf = io.BytesIO()
        np.save(buf, rng.uniform(size=shape).astype(np.float32))
        proc.stdin.write(buf.getvalue())
        sent += batch
        if sent > warm and (not trace or sent - warm - trace[-1][0] >= every):
            proc.stdin.flush()
            while lines[0] < sent - 4 * batch:  # let the child catch up before sampling it
                time.sleep(0.01)
            trace.append((sent - warm, rss_mib(proc.pid), fds(proc.pid)))
    proc.stdin.close()
    rc = proc.wait(timeout=600)
    reader.join(timeout=60)
    seconds = time.perf_counter() - t0
    return {"samples": sent - warm, "batch": batch, "seconds": round(seconds, 1), "exit_code": rc,
            "records": lines[0] - warm, **_summary(trace)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(ROOT / "runs" / "demo" / "model.jei"))
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak"))
    args = ap.parse_args(argv)
    bundle = Path(args.bundle)
    if not bundle.exists():
        from jei_edge.compile import BuildOptions, build_bundle

        build_bundle(bundle.with_suffix(".pt"), bundle, BuildOptions())
    result = {"command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *(argv or sys.argv[1:])]),
              "machine": machine(), "bundle": str(bundle),
              "runtime_loop": soak_runtime(bundle, args.samples, args.batch),
              "jei_edge_run_stdin": soak_stream(bundle, args.samples, args.batch)}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Soak run: {args.samples:,} samples, batch {args.batch}", "",
             f"`{result['command']}` at commit `{result['machine']['commit']}` on {result['machine']['cpu']} "
             f"({result['machine']['cores']} cores).", "",
             "| path | samples | seconds | RSS first / last / max (MiB) | RSS growth (MiB) | fds first / last / max |",
             "|---|---|---|---|---|---|"]
    for name, r in (("Runtime.run loop", result["runtime_loop"]), ("jei-edge-run, stdin stream",
                                                                   result["jei_edge_run_stdin"])):
        lines.append(f"| {name} | {r['samples']:,} | {r['seconds']} | {r['rss_first_mib']} / {r['rss_last_mib']} / "
                     f"{r['rss_max_mib']} | {r['rss_growth_mib']:+} | {r['fd_first']} / {r['fd_last']} / {r['fd_max']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
