"""The service's settings, free of Ray so the launcher can set Ray's environment before Ray is imported."""
from __future__ import annotations

from dataclasses import dataclass, field

APP_NAME = "ldm-export"


@dataclass
class ServeConfig:
    """What ``ldm-export serve`` passes to the application (the ``args`` of its ``serve deploy`` config)."""

    bundle: str
    provider: str = "cpu"
    replicas: int = 1
    max_batch: int = 4
    batch_wait_s: float = 0.05
    max_queued: int = 16
    max_images: int = 8
    max_size: tuple[int, int] | None = None  # None: twice the bundle's resolution each side
    threads: int | None = None
    api_auth: str | None = None  # "USER:PASS[,USER:PASS...]", A1111's --api-auth
    request_timeout_s: float = 600.0
    retry_after_s: int = 2
    grace_s: float = 30.0
    gpus_per_replica: float = field(default=0.0)

    def __post_init__(self):
        if isinstance(self.max_size, list):
            self.max_size = tuple(self.max_size)
