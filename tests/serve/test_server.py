"""A real Triton server (the nvidia-pytriton wheel's tritonserver) on loopback, queried with tritonclient.

Every server starts on free ports, is waited for with a timeout and is always stopped (the
fixtures' ``finally`` and ``TritonServer``'s context manager); request counts are bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from jei_edge.runtime import Runtime
from jei_edge.serve.client import Client, mismatches
from jei_edge.serve.handler import Handler, ModelSpec
from jei_edge.serve.repository import RepositoryOptions, write_repository
from jei_edge.serve.server import Ports, TritonServer
from tests.serve.conftest import ROOT, samples

pytestmark = pytest.mark.serve
OPTS = dict(backend_options=("intra_op_threads=1",))


@pytest.fixture(scope="module")
def rt(serve_bundle):
    with Runtime.load(serve_bundle, device="cpu", intra_op_threads=1) as r:
        yield r


def reference(rt, x, mode="exit"):
    """The runtime's answer for ``x`` (``Handler.run``: ``Runtime.run`` plus the response fields)."""
    return Handler(rt, ModelSpec("ref", mode=mode)).run(x)


def rows(out, a, b):
    return {k: v[a:b] for k, v in out.items()}


@pytest.fixture(scope="module")
def server(serve_env, serve_bundle, tmp_path_factory):
    repo = write_repository(serve_bundle, tmp_path_factory.mktemp("repo") / "models",
                            RepositoryOptions(modes=("exit", "full", "plain"), instances=2, max_queue_delay_us=500,
                                              **OPTS))
    with TritonServer(repo, Ports.free(), exit_timeout_s=5) as s:
        yield s


def metric(text: str, name: str, model: str) -> float:
    pat = re.compile(rf'^{name}\{{([^}}]*)\}} ([0-9.eE+-]+)$', re.M)
    return sum(float(v) for labels, v in pat.findall(text) if f'model="{model}"' in labels)


def send_all(url, protocol, x, sizes, threads, model="jei", raw=False):
    """Send ``x`` in requests of ``sizes`` (cycled) from ``threads`` clients; [(start, stop, answer)]."""
    spans, start, i = [], 0, 0
    while start < len(x):
        stop = min(len(x), start + sizes[i % len(sizes)])
        spans.append((start, stop))
        start, i = stop, i + 1
    chunks = [spans[t::threads] for t in range(threads)]

    def work(chunk):
        with Client(url, protocol, model) as c:
            return [(a, b, c.infer(x[a:b], raw=raw)) for a, b in chunk]

    with ThreadPoolExecutor(threads) as pool:
        return [r for part in pool.map(work, chunks) for r in part]


def test_parity_1000_samples_http_and_grpc(server, rt):
    x = samples(1000, seed=10)
    want = reference(rt, x)
    got = (send_all(server.http_url, "http", x[:500], [1, 1, 2, 1, 5, 1, 3], threads=4)
           + [(a + 500, b + 500, o) for a, b, o in send_all(server.grpc_url, "grpc", x[500:], [1, 2, 1, 7], threads=4)])
    assert sorted((a, b) for a, b, _ in got)[-1][1] == 1000 and sum(b - a for a, b, _ in got) == 1000
    bad = [(a, b, p) for a, b, o in got for p in mismatches(o, rows(want, a, b))]
    assert not bad, bad[:5]
    exits = np.concatenate([o["exit"][:, 0] for _, _, o in sorted(got, key=lambda t: t[0])])
    assert len(set(exits.tolist())) > 2  # early exit really happened at several depths
    batches = server.stats("jei")["model_stats"][0]["batch_stats"]
    assert max(b["batch_size"] for b in batches) > 1  # the dynamic batcher merged concurrent requests


def test_raw_input_full_and_plain_models(server, rt):
    from jei_edge.data.transforms import raw_to_model

    raw = np.random.default_rng(11).random((40, 1, 8, 8)).astype(np.float32)
    got = send_all(server.http_url, "http", raw, [1, 3], threads=2, raw=True)
    want = reference(rt, raw_to_model(raw, rt.preprocessing))
    assert not [p for a, b, o in got for p in mismatches(o, rows(want, a, b))]
    x = samples(30, seed=12)
    for model, mode in (("jei_full", "full"), ("jei_plain", "plain")):
        got = send_all(server.grpc_url, "grpc", x, [1, 4], threads=2, model=model)
        want = reference(rt, x, mode)
        assert not [p for a, b, o in got for p in mismatches(o, rows(want, a, b))], model


BAD = [  # (name, array, datatype, input name, what the error names)
    ("nan", np.full((1, 1, 8, 8), np.nan, np.float32), "FP32", "x", "NaN"),
    ("raw out of range", np.full((2, 1, 8, 8), 5.0, np.float32), "FP32", "x_raw", "outside the raw range"),
    ("wrong shape", np.zeros((1, 1, 8, 9), np.float32), "FP32", "x", "unexpected shape"),
    ("wrong rank", np.zeros((1, 8, 8), np.float32), "FP32", "x", "unexpected shape"),
    ("wrong dtype", np.zeros((1, 1, 8, 8), np.float64), "FP64", "x", "data-type is 'FP64'"),
    ("empty", np.zeros((0, 1, 8, 8), np.float32), "FP32", "x", "x"),
    ("unknown input", np.zeros((1, 1, 8, 8), np.float32), "FP32", "image", "image"),
]


def test_malformed_burst_mixed_with_good_requests(server, rt):
    from tritonclient.utils import InferenceServerException

    before = server.metrics()
    x = samples(240, seed=13)
    want = reference(rt, x)
    errors = []

    def bad_client(protocol):
        out = []
        with Client(server.http_url if protocol == "http" else server.grpc_url, protocol) as c:
            for _ in range(4):
                for name, arr, dtype, inp, expect in BAD:
                    try:
                        c.infer(arr, datatype=dtype, name=inp)
                        out.append(f"{name}: answered")
                    except InferenceServerException as exc:
                        if expect not in str(exc):
                            out.append(f"{name}: {exc}")
        return out

    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(bad_client, p) for p in ("http", "grpc")]
        got = send_all(server.http_url, "http", x, [1, 2], threads=4)
        for f in futs:
            errors += f.result()
    assert not errors, errors[:5]
    assert not [p for a, b, o in got for p in mismatches(o, rows(want, a, b))]
    after = server.metrics()
    # the model itself refused NaN and out-of-range raw (4 rounds x 2 clients); Triton refused the rest
    assert metric(after, "jei_edge_rejected_requests_total", "jei") - metric(
        before, "jei_edge_rejected_requests_total", "jei") == 16
    n = metric(after, "jei_edge_samples_total", "jei") - metric(before, "jei_edge_samples_total", "jei")
    cost = metric(after, "jei_edge_cost_total", "jei") - metric(before, "jei_edge_cost_total", "jei")
    assert n == 240
    assert cost / n == pytest.approx(float(want["cost"].astype(np.float64).mean()), rel=1e-5)
    for k in range(rt.num_exits):  # samples per exit, as the runtime exited them
        pat = f'jei_edge_samples_total{{exit="{k}",model="jei"}}'
        delta = sum(float(l.split()[-1]) for l in after.splitlines() if l.startswith(pat)) - sum(
            float(l.split()[-1]) for l in before.splitlines() if l.startswith(pat))
        assert delta == int((want["exit"] == k).sum())
    assert "nv_inference_count" in after  # Triton's own metrics beside ours


def test_disconnects_mid_request_do_not_disturb_others(server, rt):
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": samples(1, seed=14).ravel().tolist()}]}).encode()
    head = (f"POST /v2/models/jei/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    host, port = server.http_url.split(":")
    for cut in (len(head) // 2, len(head) + len(body) // 2, len(head) + len(body)):  # mid-header, mid-body, whole
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall((head + body)[:cut])
    from tritonclient.utils import InferenceServerException

    with Client(server.grpc_url, "grpc") as c:  # a gRPC client that gives up before the answer
        c.timeout_s = 1e-4
        for _ in range(3):
            with pytest.raises(InferenceServerException):
                c.infer(samples(64, seed=15))
    x = samples(50, seed=16)
    got = send_all(server.http_url, "http", x, [1], threads=2)
    assert not [p for a, b, o in got for p in mismatches(o, rows(reference(rt, x), a, b))]


def test_graceful_shutdown_answers_in_flight_requests_and_restart(serve_env, serve_bundle, rt, tmp_path):
    """SIGTERM while requests wait in the batcher's queue (1 s delay): every one is answered right."""
    repo = write_repository(serve_bundle, tmp_path / "models",
                            RepositoryOptions(max_queue_delay_us=1_000_000, max_batch_size=128, **OPTS))
    x = samples(64, seed=17)
    want = reference(rt, x)
    ports = Ports.free()
    def one(url, i):
        with Client(url, "grpc") as c:
            return c.infer(x[8 * i:8 * i + 8])

    with TritonServer(repo, ports, exit_timeout_s=10) as srv:
        with ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(one, srv.grpc_url, i) for i in range(8)]
            time.sleep(0.4)
            assert not any(f.done() for f in futs), "requests should still wait in the queue"
            srv.signal(signal.SIGTERM)
            answers = [f.result(timeout=30) for f in futs]
        t = time.monotonic()
        assert srv.wait(30) == 0
        stopped_s = time.monotonic() - t
    assert not [p for i, o in enumerate(answers) for p in mismatches(o, rows(want, 8 * i, 8 * i + 8))]
    print(f"stopped {stopped_s:.1f} s after the last answer")
    with TritonServer(repo, ports, exit_timeout_s=5) as srv:  # restart on the same ports
        got = send_all(srv.http_url, "http", x, [1, 3], threads=2)
        assert not [p for a, b, o in got for p in mismatches(o, rows(want, a, b))]


def test_a_client_across_a_restart_loses_nothing(serve_env, serve_bundle, rt, tmp_path):
    """A client sending while the server restarts gets clean errors during the gap (then retries),
    never a wrong answer; every request ends up answered right."""
    repo = write_repository(serve_bundle, tmp_path / "models", RepositoryOptions(**OPTS))
    x = samples(200, seed=21)
    want = reference(rt, x)
    ports = Ports.free()
    got, errors, half = {}, [], threading.Event()

    def client():
        c = Client(f"127.0.0.1:{ports.http}", "http", timeout_s=10)
        for i in range(len(x)):
            for _ in range(300):  # bounded: ~60 s of retries
                try:
                    got[i] = c.infer(x[i:i + 1])
                    break
                except Exception as exc:  # transport errors while the server is down (types vary by client)
                    errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
                    c.close()
                    time.sleep(0.2)
                    c = Client(f"127.0.0.1:{ports.http}", "http", timeout_s=10)
            if i == 40:
                half.set()
            time.sleep(0.05)  # paced, so that the stream spans the restart
        c.close()

    srv = TritonServer(repo, ports, exit_timeout_s=1).start()
    t = threading.Thread(target=client)
    try:
        t.start()
        assert half.wait(60)
        srv.stop()
        srv = TritonServer(repo, ports, exit_timeout_s=5).start()
        t.join(120)
    finally:
        srv.stop()
    assert not t.is_alive() and len(got) == len(x)
    assert errors, "the client should have met the restart"
    print(f"{len(errors)} failed attempts during the restart, e.g. {sorted(set(e.split(':')[0] for e in errors))}")
    assert not [p for i, o in got.items() for p in mismatches(o, rows(want, i, i + 1))]


def test_export_triton_repository_serves_on_the_bare_binary(serve_env, serve_bundle, rt, tmp_path):
    from jei_edge.cli import main

    out = tmp_path / "models"
    assert main(["export", "triton", str(serve_bundle), "-o", str(out), "--models", "exit,full",
                 "--backend-opt", "intra_op_threads=1", "--instances", "1"]) == 0
    assert main(["export", "triton", str(serve_bundle), "-o", str(out)]) == 2  # exists: refused
    x = samples(20, seed=18)
    with TritonServer(out, Ports.free(), exit_timeout_s=5) as srv:
        for model, mode in (("jei", "exit"), ("jei_full", "full")):
            got = send_all(srv.http_url, "http", x, [2], threads=1, model=model)
            assert not [p for a, b, o in got for p in mismatches(o, rows(reference(rt, x, mode), a, b))]


def test_a_model_that_cannot_load_is_one_clear_error(serve_env, serve_bundle, tmp_path):
    """An altered bundle in a repository: Triton exits, the error names the file, nothing is left running."""
    from jei_edge.serve.server import ServerError

    out = write_repository(serve_bundle, tmp_path / "models", RepositoryOptions(**OPTS))
    with open(out / "jei" / "1" / "model.jei" / "stages" / "stage0.onnx", "ab") as f:
        f.write(b"garbage")
    ports = Ports.free()
    with pytest.raises(ServerError, match="integrity check.*stage0.onnx"):
        TritonServer(out, ports, exit_timeout_s=2).start(60)
    assert not _tritonservers_with(f"--http-port={ports.http}")


def _tritonservers_with(arg: str):
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"tritonserver") and arg.encode() in cmd:
            pids.append(int(d.name))
    return pids


@contextlib.contextmanager
def _serve_command(bundle, *extra):
    """``jei-edge serve BUNDLE`` on free loopback ports, as ``(process, ports)``; afterwards nothing
    of it is left running (the command killed if it still runs, its tritonserver too)."""
    ports = Ports.free()
    cmd = [sys.executable, "-m", "jei_edge.cli", "serve", str(bundle), "--http-port", str(ports.http),
           "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics), "--exit-timeout", "5", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, ports
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in _tritonservers_with(f"--http-port={ports.http}"):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_command_stops_on_signal_without_orphans(serve_env, serve_bundle, rt, sig):
    with _serve_command(serve_bundle, "--backend-opt", "intra_op_threads=1", "--instances", "2") as (proc, ports):
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        # the command's own readiness line (Triton can answer health checks before the command has seen it ready)
        first = _line_within(proc.stdout, 60)
        assert first.startswith("serving "), first
        x = samples(5, seed=19)
        with Client(f"127.0.0.1:{ports.http}", "http") as c:
            assert not mismatches(c.infer(x), reference(rt, x))
        assert _tritonservers_with(f"--http-port={ports.http}")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "stopped" in err
        assert not _tritonservers_with(f"--http-port={ports.http}")


def _line_within(stream, seconds: float) -> str:
    """The next line of a child's text stream, or '' after ``seconds`` (the child may never write one)."""
    import select

    ready, _, _ = select.select([stream], [], [], seconds)
    return stream.readline() if ready else ""


def test_serve_command_stopped_while_starting_exits_cleanly(serve_env, serve_bundle):
    """A stop asked for before Triton is ready (or before its process exists) is a clean stop: exit 0,
    no 'exited while starting' error, no tritonserver left behind."""
    with _serve_command(serve_bundle) as (proc, ports):
        assert "starting Triton" in _line_within(proc.stderr, 60)  # the signal handlers are in place
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "stopped (signal SIGTERM)" in err and "Traceback" not in err and "error" not in err
        assert not _tritonservers_with(f"--http-port={ports.http}")


def test_serve_refuses_bad_options_in_one_line(serve_env, serve_bundle):
    out = subprocess.run([sys.executable, "-m", "jei_edge.cli", "serve", str(serve_bundle), "--http-port", "9",
                          "--grpc-port", "9"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ports 9, 9") and out.stderr.count("\n") <= 2


def test_serving_benchmark_smoke(serve_env, serve_bundle, tmp_path):
    """benchmarks/serving.py end to end on the test bundle, tiny: results written, nothing lost or wrong."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.serving import main as bench

    np.savez(tmp_path / "x.npz", x=samples(16, seed=20))
    out = tmp_path / "serving"
    assert bench(["--bundle", str(serve_bundle), "--inputs", str(tmp_path / "x.npz"), "--preprocessed",
                  "--concurrency", "1,4", "--requests", "12", "--repeats", "2", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    for c in ("1", "4"):
        row = res["results"][c]
        assert {m: row[m]["lost"] + row[m]["duplicated"] + row[m]["mismatched"] for m in ("exit", "full", "plain")} \
            == {"exit": 0, "full": 0, "plain": 0}
        assert row["exit"]["metrics_mean_cost"] == pytest.approx(row["exit"]["realized_cost"], rel=1e-5)
        assert row["full"]["realized_cost"] == pytest.approx(1.0)
    assert "| 4 | exit |" in out.with_suffix(".md").read_text()
