"""Bounded load run of ``dermgraph serve`` on 127.0.0.1: C concurrent clients × N cases each.

Each case is uploaded (it pauses for review) and then signed off, so both endpoints that run the
graph are exercised. The script starts the server itself on a free loopback port, stops it at the
end, and prints requests/s, p50/p95 latency per endpoint, errors, and lost or duplicated cases
(cases the server lists vs cases the clients created). It never talks to anything but 127.0.0.1.

    python scripts/bench_serve.py --clients 4 --cases 25 --backends agent.testing:backends   # serving overhead
    python scripts/bench_serve.py --clients 2 --cases 3 --images ../shared/data/isic2018_val/images   # real models
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_images(n: int) -> list[bytes]:
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        im = Image.new("RGB", (320, 240), (170 - i % 40, 120 - i % 30, 100))
        ImageDraw.Draw(im).ellipse((80 + i % 20, 50, 240, 190 - i % 25), fill=(90 + i % 50, 55, 40))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def folder_images(folder: Path, n: int) -> list[bytes]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if len(files) < n:
        raise SystemExit(f"{folder} has {len(files)} images, {n} needed")
    return [p.read_bytes() for p in files]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--cases", type=int, default=25, help="Cases per client.")
    ap.add_argument("--images", type=Path, help="Folder of images (default: synthetic lesion-like JPEGs).")
    ap.add_argument("--backends", help="module:callable of backend doubles (default: the real models).")
    ap.add_argument("--timeout", type=float, default=1800, help="Stop everything after this many seconds.")
    args = ap.parse_args()

    total = args.clients * args.cases
    images = folder_images(args.images, total) if args.images else synthetic_images(total)
    token = secrets.token_hex(16)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = Path(tempfile.mkdtemp(prefix="dermgraph-bench-"))
    env = dict(os.environ, DERMGRAPH_API_TOKENS=token, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "dermgraph", "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data), "--rate-limit", "100000"]
    if args.backends:
        cmd += ["--backends", args.backends]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.time() + args.timeout
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit("server exited during start-up")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # Warm-up (model loading) is not part of the measurement.
        with httpx.Client(timeout=600) as c:
            c.post(f"{url}/v1/cases", files={"image": ("w.jpg", images[0], "image/jpeg")}, data={"review": "never"}, headers=headers).raise_for_status()

        lat: dict[str, list[float]] = {"create": [], "review": []}
        errors: list[str] = []
        created: list[str] = []

        def client(k: int) -> None:
            with httpx.Client(timeout=600) as c:
                for i in range(args.cases):
                    if time.time() > deadline:
                        errors.append("deadline reached")
                        return
                    img = images[k * args.cases + i]
                    t0 = time.perf_counter()
                    r = c.post(f"{url}/v1/cases", files={"image": (f"{k}-{i}.jpg", img, "image/jpeg")}, headers=headers)
                    lat["create"].append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        errors.append(f"create {r.status_code}")
                        continue
                    body = r.json()
                    created.append(body["case_id"])
                    if body["status"] != "awaiting_review":
                        continue
                    t0 = time.perf_counter()
                    r = c.post(f"{url}/v1/cases/{body['case_id']}/review", json={"reviewer": f"bench-{k}", "diagnosis": body["diagnosis"]["label"]}, headers=headers)
                    lat["review"].append(time.perf_counter() - t0)
                    if r.status_code != 200 or r.json()["status"] != "complete":
                        errors.append(f"review {r.status_code}")

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
        wall = time.perf_counter() - t0

        with httpx.Client(timeout=600) as c:
            listed = [x["case_id"] for x in c.get(f"{url}/v1/cases", headers=headers).json()]
            waiting = c.get(f"{url}/v1/cases?status=awaiting_review", headers=headers).json()
        listed_set = set(listed) - {listed[0]} if listed else set()  # the warm-up case
        lost = len(set(created) - listed_set)
        duplicated = len(listed) - len(set(listed))
        n_req = len(lat["create"]) + len(lat["review"])
        print(f"clients {args.clients} x cases {args.cases} = {total} cases; backends: {args.backends or 'real models'}; images: {args.images or 'synthetic'}")
        print(f"requests {n_req} in {wall:.1f} s: {n_req / wall:.2f} requests/s, {len(created) / wall:.2f} cases/s")
        for name, xs in lat.items():
            if xs:
                print(f"  {name:7s} n={len(xs):4d} p50 {pct(xs, 0.5) * 1000:8.1f} ms  p95 {pct(xs, 0.95) * 1000:8.1f} ms  mean {statistics.mean(xs) * 1000:8.1f} ms")
        print(f"errors {len(errors)}{' ' + str(sorted(set(errors))) if errors else ''}; lost cases {lost}; duplicated {duplicated}; still awaiting review {len(waiting)}")
        return 0 if not errors and not lost and not duplicated else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
