"""A bounded load test of the web app's JSON API (`python -m mlx_clip.ui`) on localhost.

    python -m benchmarks.ui_load [--runs RUNS] [--index FOLDER] [--clients 8] [--seconds 30]
                                 [--url http://127.0.0.1:PORT] [--out RESULT.json]

Starts the app as its own process (or uses --url) and runs --clients concurrent clients, each on
one keep-alive connection, for --seconds. Each client cycles through text embeddings (4 texts),
image embeddings (1 image), zero-shot classification (1 image, 6 labels) and folder search
(1 query); one request in 20 is a deliberately undecodable upload, which must get a 400.

Without --runs it trains a small run first (a few seconds) and indexes a folder of built-in images.
Prints and writes JSON (benchmarks/results/ui-load-<UTC time>.json, or --out): requests/s, p50 and
p99 latency overall and per kind, status counts, errors (anything but the expected answers:
5xx, refused connections, a bad upload not answered 400) and whether the server was still up at
the end. Exits 1 on any 5xx or a server that went down. Not run in CI (tests/test_ui_app.py runs
`load` for a second against its own server).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from .common import RESULTS_DIR, record_header

LABELS = ["red", "green", "blue", "yellow", "purple", "orange"]
TEXTS = ["a red circle", "a small blue square", "a green cross at the top", "two yellow triangles"]
KINDS = ("embed_text", "embed_image", "classify", "search")


def payloads(image_b64: str) -> dict[str, tuple[str, dict]]:
    return {
        "embed_text": ("/v1/embeddings", {"input": TEXTS}),
        "embed_image": ("/v1/embeddings", {"images": [image_b64]}),
        "classify": ("/v1/classify", {"image": image_b64, "labels": LABELS}),
        "search": ("/v1/search", {"query": "a red circle", "top": 5}),
        "bad_upload": (
            "/v1/classify",
            {"image": base64.b64encode(b"not an image").decode(), "labels": LABELS},
        ),
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def client(base: str, requests: dict, stop_at: float, index: int, out: list) -> None:
    """One client: requests in turn on one connection until stop_at; (kind, status, seconds) to out."""
    host, port = urlsplit(base).hostname, urlsplit(base).port
    conn, n = http.client.HTTPConnection(host, port, timeout=60), index
    while time.perf_counter() < stop_at:
        kind = "bad_upload" if n % 20 == 19 else KINDS[n % len(KINDS)]
        n += 1
        path, body = requests[kind]
        start = time.perf_counter()
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            status = response.status
            if response.getheader("Connection", "").lower() == "close":
                conn.close()
        except (OSError, http.client.HTTPException):
            status = None  # refused, reset or timed out
            conn.close()
        out.append((kind, status, time.perf_counter() - start))


def load(base: str, image_b64: str, clients: int = 8, seconds: float = 30.0) -> dict:
    """Run the clients against a server at `base`; the summary of what they saw."""
    requests, results, threads = payloads(image_b64), [], []
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()
    for i in range(clients):
        threads.append(threading.Thread(target=client, args=(base, requests, stop_at, i, results)))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    statuses: dict[str, int] = {}
    for _, status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    errors = [
        r
        for r in results
        if r[1] is None or r[1] >= 500 or (r[1] != 400 if r[0] == "bad_upload" else r[1] != 200)
    ]
    good = [r for r in results if r[0] != "bad_upload" and r[1] == 200]
    ms = lambda xs: [1000 * x for x in xs]  # noqa: E731
    per_kind = {}
    for kind in KINDS:
        lat = ms([r[2] for r in good if r[0] == kind])
        per_kind[kind] = {
            "requests": len(lat),
            "p50_ms": percentile(lat, 0.5),
            "p99_ms": percentile(lat, 0.99),
        }
    latencies = ms([r[2] for r in good])
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "ok_per_s": len(good) / wall,
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "mean_ms": statistics.fmean(latencies) if latencies else None,
        "per_kind": per_kind,
        "statuses": statuses,
        "errors": len(errors),
        "server_errors_5xx": sum(1 for r in results if r[1] is not None and r[1] >= 500),
        "alive_after": alive(base),
    }


def alive(base: str) -> bool:
    u = urlsplit(base)
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("GET", "/api/runs")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False


def prepare(tmp: Path) -> tuple[Path, Path]:
    """A runs folder with one small trained run, and a folder of built-in images (with captions)."""
    from mlx_clip.data.synthetic import write_dataset
    from mlx_clip.train import main as train_main

    runs = tmp / "runs"
    small = "--model.image_size 32 --model.patch_size 8 --model.vision_width 64 --model.vision_heads 2 "
    small += "--model.vision_layers 2 --model.text_width 64 --model.text_layers 2 --model.context_length 16 "
    small += "--model.vocab_size 600 --model.embed_dim 32 --data.builtin_train_size 256 "
    small += (
        "--data.builtin_val_size 48 --data.batch_size 16 --train.progress false --eval.every 0 --steps 20"
    )
    train_main(["--out", str(runs / "load"), *small.split()])
    return runs, write_dataset(tmp / "images", 64, image_size=48, fmt="folder", part="val")


def start_server(runs: Path, index: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mlx_clip.ui", "--runs", str(runs), "--index", str(index), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "mlx_clip ui: http://localhost:PORT/  (runs: ...)"
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"the app did not start: {line!r}")
    return proc, line.split()[2].rstrip("/").replace("localhost", "127.0.0.1")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ui_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", help="runs folder with a checkpoint (default: train a small run)")
    p.add_argument("--index", help="image folder to search (default: built-in images)")
    p.add_argument("--url", help="an already running app (default: start one)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--out", help="result JSON (default: benchmarks/results/ui-load-<time>.json)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs, index = (Path(args.runs), Path(args.index)) if args.runs and args.index else prepare(Path(tmp))
        image = sorted(index.glob("*.png"))[0]
        proc, base = (None, args.url) if args.url else start_server(runs, index)
        try:
            for kind in ("embed_text", "search"):  # load the model and build the index before timing
                client(base, payloads(""), time.perf_counter() + 0.01, KINDS.index(kind), [])
            summary = load(base, base64.b64encode(image.read_bytes()).decode(), args.clients, args.seconds)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    record = {**record_header("ui_load"), "result": summary}
    out = Path(args.out) if args.out else RESULTS_DIR / f"ui-load-{time.strftime('%Y-%m-%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"written: {out}")
    if summary["server_errors_5xx"] or not summary["alive_after"]:
        sys.exit(1)
    return record


if __name__ == "__main__":
    main()
