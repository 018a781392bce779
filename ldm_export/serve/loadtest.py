"""Load test of a running service: N concurrent clients send a fixed number of txt2img requests.

Reports p50/p99 latency, throughput, errors, the mean UNet batch the server formed, and the resident memory of
each model replica before and after (local services only: replicas are found among the server's processes).
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldm_export.runtime.errors import LdmExportError

logger = logging.getLogger(__name__)
REPLICA_TITLE = "ServeReplica:ldm-export:Generator"


@dataclass
class Result:
    clients: int
    requests: int
    ok: int
    errors: dict[str, int]
    p50_s: float
    p99_s: float
    wall_s: float
    requests_per_s: float
    images_per_s: float
    mean_unet_batch: float
    rss_before_mb: list[float] = field(default_factory=list)
    rss_after_mb: list[float] = field(default_factory=list)


def post(url: str, body: dict, auth: str | None = None, timeout: float = 600.0) -> tuple[int, dict, dict]:
    """POST JSON; (status, parsed body, headers). Connection failures are status 0."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}"), dict(r.headers)
    except urllib.error.HTTPError as e:
        try:
            payload = json.loads(e.read() or b"{}")
        except ValueError:
            payload = {}
        return e.code, payload, dict(e.headers)
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
        return 0, {"error": str(e) or type(e).__name__}, {}


def get(url: str, auth: str | None = None, timeout: float = 10.0) -> tuple[int, object]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    # HTTPException: something that is not an HTTP server answered (another program's port): not ready, not a crash
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, http.client.HTTPException):
        return 0, None


def wait_healthy(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``/healthz`` until 200 (the port refuses, then 404s, while Serve starts)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc is not None and proc.poll() is not None:
            raise LdmExportError(f"the server exited with code {proc.returncode} before it was ready")
        status, _ = get(base_url + "/healthz", timeout=5)
        if status == 200:
            return
        time.sleep(0.5)
    raise LdmExportError(f"{base_url} was not healthy within {timeout:.0f} s")


def replica_rss_mb(server_pid: int) -> list[float]:
    """Resident memory (MB) of each Generator replica among ``server_pid``'s descendant processes."""
    import psutil

    try:
        procs = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            if REPLICA_TITLE in " ".join(p.cmdline()):
                out.append(p.memory_info().rss / 2**20)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(out)


def run_load(base_url: str, body: dict, clients: int, requests: int, auth: str | None = None,
             server_pid: int | None = None, timeout: float = 600.0) -> Result:
    """``clients`` threads share ``requests`` POSTs of ``body`` (seeds vary); every request is timed."""
    url = base_url + "/sdapi/v1/txt2img"
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies, batches, errors, images = [], [], {}, [0]

    def client():
        while True:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            t0 = time.perf_counter()
            status, payload, _ = post(url, {**body, "seed": 1000 + k}, auth=auth, timeout=timeout)
            dt = time.perf_counter() - t0
            with lock:
                if status == 200:
                    latencies.append(dt)
                    images[0] += len(payload.get("images", []))
                    info = json.loads(payload["info"])
                    batches.extend(info.get("ldm_export", {}).get("unet_batch", []))
                else:
                    key = str(status)
                    errors[key] = errors.get(key, 0) + 1

    before = replica_rss_mb(server_pid) if server_pid else []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for f in [ex.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    after = replica_rss_mb(server_pid) if server_pid else []
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    return Result(clients=clients, requests=requests, ok=len(latencies), errors=errors,
                  p50_s=float(np.percentile(lat, 50)), p99_s=float(np.percentile(lat, 99)), wall_s=wall,
                  requests_per_s=len(latencies) / wall, images_per_s=images[0] / wall,
                  mean_unet_batch=float(np.mean(batches)) if batches else float("nan"),
                  rss_before_mb=before, rss_after_mb=after)


def start_server(bundle: Path, port: int, extra_args: list[str], log_path: Path) -> subprocess.Popen:
    """``ldm-export serve BUNDLE --port PORT ...`` in a child process (its output to ``log_path``)."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "ldm_export.cli", "serve", str(bundle), "--port", str(port),
                             *extra_args], stdout=log, stderr=subprocess.STDOUT)


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM, then wait for the graceful shutdown (SIGKILL only if it hangs past ``timeout``)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# Ray binds its worker ports in 10002-19999 and its other services on ports the kernel picks (32768 and up on Linux):
# a port the kernel picked for the service could be taken by Ray while Serve starts (a gRPC server then answered the
# health check). The service's port comes from between those ranges.
SERVICE_PORTS = (20000, 32000)


def free_port(low: int = SERVICE_PORTS[0], high: int = SERVICE_PORTS[1], tries: int = 200) -> int:
    """A port in [low, high) that is free on 127.0.0.1 now, outside the ranges Ray takes its own ports from."""
    import random
    import socket

    for port in random.sample(range(low, high), min(tries, high - low)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise LdmExportError(f"no free port between {low} and {high} on 127.0.0.1; stop other services or pass --url")
