"""`ldm-export serve` and `ldm-export loadtest`: click commands; Ray is imported only when a command runs."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import click
from rich.markup import escape

from ldm_export.cli_common import _guard, console, out_console
from ldm_export.runtime.errors import LdmExportError


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise LdmExportError(f"--max-size must look like 1024x1024 (WIDTHxHEIGHT), got '{text}'") from None
    return w, h


def _require_serve_extra() -> None:
    import importlib.util

    # found, not imported: Ray reads its environment (set by the service) when first imported
    for name in ("ray", "fastapi", "yaml", "psutil"):
        if importlib.util.find_spec(name) is None:
            raise LdmExportError(f"serving needs the [serve] extra ({name} is missing): pip install 'ldm-export[serve]'")


def _check_auth(api_auth: str | None) -> None:
    for pair in (api_auth or "").split(","):
        if pair and (":" not in pair or not pair.split(":", 1)[0]):
            raise LdmExportError("--api-auth must be USER:PASS (several separated by commas)")


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model replicas (one Pipeline each): one per GPU with --provider cuda, or N on a CPU.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on; 0.0.0.0 opens it to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="Most images one replica runs as one UNet batch (Ray Serve batching).")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=50, show_default=True,
              help="How long a replica waits for more images to fill a batch.")
@click.option("--max-queued", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images waiting for a replica past which requests get 503 + Retry-After.")
@click.option("--max-images", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most images (batch_size x n_iter) in one request.")
@click.option("--max-size", default=None, help="Largest WIDTHxHEIGHT a request may ask (default: twice the model's resolution, within a DiT's position table).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime CPU threads per replica.")
@click.option("--api-auth", default=None, help="USER:PASS[,USER:PASS]: HTTP basic auth on every route but /healthz.")
@click.option("--address", default=None, help="A Ray cluster to run on (e.g. auto or HOST:6379; `ray start --head` makes one).")
@click.option("--serve-config", type=click.Path(path_type=Path), default=None,
              help="Where to write the `serve deploy` config (default: BUNDLE/serve.yaml).")
@click.option("--dry-run", is_flag=True, help="Check the bundle, write the serve config, and exit.")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None, help="Folder for Ray Serve's logs (default: the temp folder).")
@click.option("--temp-dir", type=click.Path(path_type=Path), default=None, help="Parent of the temporary folder (default: $TMPDIR).")
@click.option("--grace", type=click.FloatRange(min=0), default=30, show_default=True,
              help="Seconds in-flight requests get to finish on SIGINT/SIGTERM.")
@click.option("--request-timeout", type=click.FloatRange(min=1), default=600, show_default=True)
@click.option("--start-timeout", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Seconds the replicas get to load the bundle.")
@_guard
def serve(bundle, replicas, host, port, provider, max_batch, batch_wait_ms, max_queued, max_images, max_size, threads,
          api_auth, address, serve_config, dry_run, log_dir, temp_dir, grace, request_timeout, start_timeout):
    """Serve a bundle with AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img) on Ray Serve."""
    _require_serve_extra()
    _check_auth(api_auth)
    from ldm_export.serve.config import ServeConfig
    from ldm_export.serve.service import Service, check_bundle, check_port, make_temp_dir, write_config

    bundle = bundle.resolve()
    cfg = ServeConfig(bundle=str(bundle), provider=provider, replicas=replicas, max_batch=max_batch,
                      batch_wait_s=batch_wait_ms / 1000, max_queued=max_queued, max_images=max_images,
                      max_size=_size(max_size), threads=threads, api_auth=api_auth, request_timeout_s=request_timeout,
                      grace_s=grace, gpus_per_replica=1.0 if provider == "cuda" else 0.0)
    temp = make_temp_dir(temp_dir)  # before anything imports ONNX Runtime or Ray
    try:
        check_bundle(bundle, provider, cfg.max_size)
        try:
            config_path = write_config(cfg, host, port, serve_config or bundle / "serve.yaml")
            console.print(f"[dim]serve deploy config: {escape(str(config_path))}[/dim]", soft_wrap=True)
        except LdmExportError as e:
            if serve_config is not None or dry_run:
                raise
            console.print(f"[yellow]warning:[/yellow] {escape(str(e))}", soft_wrap=True)  # a read-only bundle still serves
        if dry_run:
            return
        if address is None:
            check_port(host, port)
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"[yellow]warning:[/yellow] listening on {host}: reachable from the network"
                          + ("" if api_auth else " with no --api-auth"), soft_wrap=True)
        _run(Service(cfg, host=host, port=port, address=address, log_dir=log_dir, temp_dir=temp,
                     start_timeout_s=start_timeout), bundle, host, port, replicas, provider)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _run(service, bundle: Path, host: str, port: int, replicas: int, provider: str) -> None:
    t0 = time.perf_counter()
    try:
        with console.status("starting Ray Serve...", spinner="dots"):
            service.start()
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        out_console.print(f"serving {escape(bundle.name)} at http://{shown}:{port} (POST /sdapi/v1/txt2img), "
                          f"{replicas} replica(s) on {provider}, ready in {time.perf_counter() - t0:.1f} s; "
                          "Ctrl-C stops", soft_wrap=True)
        service.wait()
        console.print("stopping: letting in-flight requests finish...")
    finally:
        service.stop()
    console.print("stopped")


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("--url", default=None, help="A running service (instead of starting one for BUNDLE).")
@click.option("--clients", default="1,2,4", show_default=True, help="Concurrent clients, one run per value.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=24, show_default=True, help="Requests per run.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--sampler", default="Euler a", show_default=True)
@click.option("--size", default=None, help="WIDTHxHEIGHT of every request (default: the model's).")
@click.option("--prompt", default="a red circle on the left", show_default=True)
@click.option("--replicas", type=int, default=1, show_default=True, help="With BUNDLE: replicas of the started service.")
@click.option("--max-batch", type=int, default=4, show_default=True, help="With BUNDLE: the service's --max-batch.")
@click.option("--max-queued", type=int, default=64, show_default=True, help="With BUNDLE: the service's --max-queued.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--api-auth", default=None, help="USER:PASS for the service's basic auth.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the results as JSON here.")
@_guard
def loadtest(bundle, url, clients, n_requests, steps, sampler, size, prompt, replicas, max_batch, max_queued, provider,
             api_auth, out):
    """Load-test the service: p50/p99 latency, throughput, errors, replica memory before/after."""
    from ldm_export.serve import loadtest as lt

    if (bundle is None) == (url is None):
        raise LdmExportError("give a BUNDLE (a service is started for it) or --url of a running service, not both")
    try:
        counts = [int(c) for c in clients.split(",")]
    except ValueError:
        raise LdmExportError(f"--clients must be numbers separated by commas, got '{clients}'") from None
    body = {"prompt": prompt, "steps": steps, "sampler_name": sampler, "cfg_scale": 7.5, "batch_size": 1}
    wh = _size(size)
    if wh:
        body["width"], body["height"] = wh
    proc, pid = None, None
    log_path = None
    if bundle is not None:
        _require_serve_extra()
        port = lt.free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tempfile.mkstemp(prefix="ldm-export-serve-", suffix=".log")[1])
        args = ["--replicas", str(replicas), "--max-batch", str(max_batch), "--max-queued", str(max_queued),
                "--provider", provider, "--serve-config", str(Path(tempfile.gettempdir()) / f"ldmx-{port}.yaml")]
        if api_auth:
            args += ["--api-auth", api_auth]
        proc = lt.start_server(bundle, port, args, log_path)
        pid = proc.pid
    url = url.rstrip("/")
    results = []
    try:
        with console.status(f"waiting for {url}...", spinner="dots"):
            lt.wait_healthy(url, timeout=600 if provider == "cuda" else 180, proc=proc)
        warm = lt.run_load(url, body, clients=max(counts), requests=max(counts) * replicas, auth=api_auth)
        if warm.ok == 0:
            raise LdmExportError(f"the warm-up requests failed ({warm.errors}); see the server's log {log_path or url}")
        for n in counts:
            with console.status(f"{n} client(s), {n_requests} requests...", spinner="dots"):
                results.append(lt.run_load(url, body, clients=n, requests=n_requests, auth=api_auth, server_pid=pid))
    finally:
        if proc is not None:
            lt.stop_server(proc)
            Path(tempfile.gettempdir(), f"ldmx-{port}.yaml").unlink(missing_ok=True)
            if log_path is not None and proc.returncode == 0:
                log_path.unlink(missing_ok=True)
    size_text = f"{body['width']}x{body['height']}" if wh else "the model's size"
    out_console.print(f"load test: {url}, {steps} steps, {sampler}, {size_text}, {replicas} replica(s), "
                      f"max batch {max_batch}", soft_wrap=True)
    # markdown, not a rich table: a narrow or captured console keeps it whole, and it pastes into docs
    out_console.print("| clients | requests | errors | p50 s | p99 s | req/s | img/s | mean UNet batch | "
                      "replica RSS before → after (MB) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|", soft_wrap=True)
    for r in results:
        rss = ", ".join(f"{b:.0f} → {a:.0f}" for b, a in zip(r.rss_before_mb, r.rss_after_mb)) or "-"
        errors = str(sum(r.errors.values())) + (f" {r.errors}" if r.errors else "")
        out_console.print(f"| {r.clients} | {r.requests} | {errors} | {r.p50_s:.3f} | {r.p99_s:.3f} | "
                          f"{r.requests_per_s:.2f} | {r.images_per_s:.2f} | {r.mean_unet_batch:.2f} | {rss} |",
                          soft_wrap=True, markup=False)
    if out is not None:
        out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if any(r.errors for r in results):
        raise LdmExportError("some requests failed (see the errors column)", exit_code=1)
