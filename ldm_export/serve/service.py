"""Start, run and stop the service: a loopback-only local Ray (or a given cluster), the Serve app, signals.

Local Ray is started so that nothing listens beyond 127.0.0.1 and nothing is written outside the bundle, the log
folder and one temporary folder: Ray's temp dir and its auth token live in that folder, removed at exit.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from ldm_export.runtime.errors import LdmExportError

from .config import APP_NAME, ServeConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "serve.yaml"


def check_port(host: str, port: int) -> None:
    """Refuse a port already taken before starting anything (Ray's proxy would only log the failure)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port's TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise LdmExportError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from None


def check_cluster(address: str) -> None:
    """Refuse a HOST:PORT no Ray head answers on at once (Ray itself retries for minutes); ``auto`` and
    ``ray://`` addresses go to Ray as given."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except ValueError:
        raise LdmExportError(f"--address must be HOST:PORT, auto or ray://HOST:PORT, got '{address}'") from None
    except OSError as e:
        raise LdmExportError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one with "
                             "`ray start --head` there, or check --address") from None


def check_bundle(bundle: Path, provider: str, max_size: tuple[int, int] | None = None) -> None:
    """Refuse a bundle that does not load, before Ray starts: open it and, on the CPU, create its engines once
    (a GPU's engines are created by the replicas alone: the driver keeps no GPU memory); and a --max-size past the
    largest side its denoiser takes (a DiT's position table), which would refuse every request that used it."""
    from ldm_export.runtime.bundle import Bundle
    from ldm_export.runtime.pipeline import Pipeline

    try:
        opened = Bundle.open(bundle)
        if provider == "cpu":
            Pipeline.from_bundle(bundle, provider=provider, threads=1)
    except LdmExportError as e:
        raise LdmExportError(f"the bundle does not load: {e}", exit_code=e.exit_code) from None
    except Exception as e:  # ONNX Runtime refusing a damaged graph, a missing file
        raise LdmExportError(f"the bundle {bundle} does not load ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "rebuild it with `ldm-export build`") from None
    largest = opened.family.largest_side(opened.module_configs)
    if max_size is not None and largest and max(max_size) > largest:
        raise LdmExportError(f"--max-size {max_size[0]}x{max_size[1]} is past the {largest} px a side this model's "
                             f"transformer takes (its position embedding); use --max-size "
                             f"{min(max_size[0], largest)}x{min(max_size[1], largest)} or less")


def deploy_config(cfg: ServeConfig, host: str, port: int) -> dict:
    """The ``serve deploy`` config (Ray Serve's ServeDeploySchema) that runs this same application."""
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    args.pop("api_auth")  # never written to disk; give it in the file by hand if wanted
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "ldm_export.serve.app:build_app", "args": args,
        }],
    }


def write_config(cfg: ServeConfig, host: str, port: int, path: Path) -> Path:
    """Write the ``serve deploy`` YAML atomically (temp file + rename)."""
    import yaml

    text = ("# Ray Serve config for `serve deploy` / `serve run`, written by `ldm-export serve`.\n"
            "# The bundle path must exist on every node; ldm-export[serve] must be installed there.\n")
    text += yaml.safe_dump(deploy_config(cfg, host, port), sort_keys=False)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LdmExportError(f"cannot write the serve config {path}: {e.strerror}; give another --serve-config") from None
    return path


def make_temp_dir(parent: Path | None = None) -> Path:
    """The service's one temporary folder (short: Ray's unix sockets live under it, 108-byte limit). It is also
    ``$TMPDIR`` and ``$XDG_CACHE_HOME`` of the service's processes: ONNX Runtime, when first imported, writes a
    device id under ``~/.cache`` and a ``.ses`` file under ``$TMPDIR``."""
    path = Path(tempfile.mkdtemp(prefix="ldmx-", dir=parent))
    for name, sub in (("XDG_CACHE_HOME", "cache"), ("TMPDIR", "tmp")):
        (path / sub).mkdir()
        os.environ[name] = str(path / sub)
    tempfile.tempdir = None  # re-read $TMPDIR
    return path


def local_ray_env(temp_dir: Path) -> dict[str, str]:
    """Environment for a loopback-only local Ray whose files stay in ``temp_dir``."""
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's "local only" mode: its node address is 127.0.0.1
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),  # else Ray writes ~/.ray/auth_token
        "RAY_SERVE_LOG_TO_STDERR": "0",
    }


def bind_loopback() -> None:
    """Worker setup hook: Serve replicas open their inter-deployment gRPC server on ``[::]`` (ray 2.60,
    ``replica.py``); on a local, single-machine Ray bind it to 127.0.0.1 instead."""
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server

    def loopback(server, address):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    replica.add_port_to_grpc_server = loopback


class Service:
    """One run of ``ldm-export serve``: ``start()``, ``wait()`` until SIGINT/SIGTERM, ``stop()``."""

    def __init__(self, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 7860, address: str | None = None,
                 num_cpus: int | None = None, log_dir: Path | None = None, temp_dir: Path | None = None,
                 start_timeout_s: float = 300.0):
        self.cfg, self.host, self.port, self.address = cfg, host, port, address
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.log_dir, self.temp_dir, self.start_timeout_s = log_dir, temp_dir, start_timeout_s
        self._stop = threading.Event()
        self._started = self._deployed = False

    def start(self) -> None:
        def interrupt(*_):  # until Ray is up: SIGTERM unwinds like Ctrl-C, so stop() still ends what was started
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
        if self.address is None:
            if self.temp_dir is None:
                self.temp_dir = make_temp_dir()
            os.environ.update(local_ray_env(self.temp_dir))  # before Ray's first import: it reads them once
        import ray
        from ray import serve

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines repeat what the CLI prints
        self._started = True  # from here on stop() calls ray.shutdown(), which also ends a half-started Ray
        if self.address is None:
            ray.init(num_cpus=self.num_cpus, num_gpus=None, include_dashboard=False, _temp_dir=str(self.temp_dir),
                     _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env={"worker_process_setup_hook": "ldm_export.serve.service.bind_loopback",
                                  "env_vars": {"RAY_SERVE_LOG_TO_STDERR": "0"}})
        else:
            check_cluster(self.address)
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            except ConnectionError as e:
                raise LdmExportError(f"cannot reach the Ray cluster at {self.address}: {str(e).splitlines()[0]}; "
                                     "start it with `ray start --head` or check --address") from None
        # Ray replaces the signal handlers in ray.init; ours go in after it
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        from ray.serve.schema import LoggingConfig

        from .app import build_app

        serve.start(http_options={"host": self.host, "port": self.port,
                                  "request_timeout_s": self.cfg.request_timeout_s},
                    proxy_location="HeadOnly" if self.address is None else "EveryNode")
        logging_config = LoggingConfig(logs_dir=str(self.log_dir), enable_access_log=True) if self.log_dir else None
        outcome: dict = {}

        def deploy():  # serve.run blocks until every replica is up; a signal or the timeout must not wait for it
            try:
                serve.run(build_app(asdict(self.cfg)), name=APP_NAME, route_prefix="/", blocking=False,
                          logging_config=logging_config)
                outcome["ok"] = True
            except Exception as e:
                outcome["error"] = e

        thread = threading.Thread(target=deploy, daemon=True)
        thread.start()
        t_end = time.monotonic() + self.start_timeout_s
        while thread.is_alive():
            thread.join(0.2)
            if self._stop.is_set():
                raise KeyboardInterrupt
            if time.monotonic() > t_end:
                raise LdmExportError(f"the replicas were not up within {self.start_timeout_s:.0f} s; run again with "
                                     "--log-dir DIR and read its logs, or raise --start-timeout")
        if "error" in outcome:
            raise LdmExportError(f"the service did not start: {_first_line(outcome['error'])}")
        self._deployed = True

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        """Let in-flight requests finish (Serve drains each replica for up to ``grace_s``), then end every process."""
        if self._started:
            import ray
            from ray import serve

            t0 = time.monotonic()
            if self._deployed:
                try:  # serve.shutdown() closes the proxy at once: let the ingress finish its requests first
                    handle = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
                    left = handle.drain.remote(self.cfg.grace_s).result(timeout_s=self.cfg.grace_s + 10)
                    if left:
                        logger.warning("%d request(s) still running after %.0f s; stopping anyway", left, self.cfg.grace_s)
                except Exception as e:
                    logger.warning("could not drain the ingress: %s", _first_line(e))
            try:  # on a cluster, remove our application alone: the cluster and its other apps stay
                if ray.is_initialized():
                    serve.shutdown() if self.address is None else serve.delete(APP_NAME)
            except Exception as e:  # shutting down anyway; say what failed
                logger.warning("stopping Serve failed: %s", _first_line(e))
            ray.shutdown()
            logger.info("stopped in %.1f s", time.monotonic() - t0)
            self._started = False


def _first_line(e: Exception) -> str:
    """The useful line of an exception from a replica: the LdmExportError message when there is one."""
    text = str(e)
    for line in text.splitlines():
        if "LdmExportError:" in line:
            return line.split("LdmExportError:", 1)[1].strip()
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"
