"""Swap ``forward`` on the submodules a fused kernel replaces, and put the class's own back afterwards."""
from __future__ import annotations

import logging
import types
from typing import Callable

log = logging.getLogger(__name__)


def patch_forward(module, matches: Callable[[object], bool], forward: Callable, what: str) -> list:
    """Bind ``forward`` on every submodule of ``module`` that ``matches``; return them for :func:`restore_forward`."""
    saved = []
    for m in module.modules():
        if matches(m):
            saved.append(m)
            m.forward = types.MethodType(forward, m)
    log.debug("fused %s on %d modules", what, len(saved))
    return saved


def restore_forward(saved) -> None:
    for m in saved:
        del m.forward  # back to the class's forward
