"""The few CUDA driver API calls a TensorRT engine needs (context, stream, device buffers, copies, CUDA graphs),
through ctypes on ``libcuda``: no CUDA toolkit, cuda-python or torch on the machine (a Jetson's runtime install).

Names and signatures follow ``cuda.h`` (the ``_v2`` entry points are the ones the driver exports for 64-bit
pointers). The primary context is used, the one the CUDA runtime inside TensorRT also uses, so buffers allocated
here are valid for TensorRT's execution context.
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np

from .errors import LdmExportError

log = logging.getLogger(__name__)

_CU_STREAM_NON_BLOCKING = 1
_CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1


RUN_ON_CPU = "run on the CPU with --provider cpu"


def load_libcuda(hint: str = RUN_ON_CPU):
    """The CUDA driver library; one line ending in ``hint`` (what to do instead) where there is none."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise LdmExportError(f"no NVIDIA driver on this machine (libcuda not found): TensorRT engines need an NVIDIA GPU; {hint}")


class CudaDriver:
    """Primary context of one device, one non-blocking stream, and checked driver calls."""

    def __init__(self, device: int = 0):
        self.lib = load_libcuda()
        self.call("cuInit", 0)
        dev = ctypes.c_int(0)
        self.call("cuDeviceGet", ctypes.byref(dev), device)
        self.ctx = ctypes.c_void_p()
        self.call("cuDevicePrimaryCtxRetain", ctypes.byref(self.ctx), dev)
        self.call("cuCtxSetCurrent", self.ctx)
        self.device = dev
        self.stream = ctypes.c_void_p()
        self.call("cuStreamCreate", ctypes.byref(self.stream), _CU_STREAM_NON_BLOCKING)

    def call(self, fn: str, *args) -> None:
        rc = getattr(self.lib, fn)(*args)
        if rc != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            raise LdmExportError(f"CUDA driver error {(name.value or b'?').decode()} ({rc}) in {fn}; "
                                 "check nvidia-smi, or run with --provider cpu")

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64(0)
        self.call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(max(int(nbytes), 1)))
        return ptr.value

    def free(self, ptr: int) -> None:
        if ptr:
            self.lib.cuMemFree_v2(ctypes.c_uint64(ptr))

    def to_device(self, ptr: int, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        self.call("cuMemcpyHtoDAsync_v2", ctypes.c_uint64(ptr), a.ctypes.data_as(ctypes.c_void_p),
                  ctypes.c_size_t(a.nbytes), self.stream)
        self._keep = a  # pageable memory: keep it alive until the stream syncs

    def to_host(self, a: np.ndarray, ptr: int) -> None:
        self.call("cuMemcpyDtoHAsync_v2", a.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(ptr),
                  ctypes.c_size_t(a.nbytes), self.stream)

    def synchronize(self) -> None:
        self.call("cuStreamSynchronize", self.stream)
        self._keep = None

    def capture(self, work) -> ctypes.c_void_p:
        """Record what ``work()`` enqueues on the stream as a CUDA graph and return its executable instance."""
        graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
        self.call("cuStreamBeginCapture_v2", self.stream, _CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        try:
            work()
        finally:
            self.call("cuStreamEndCapture", self.stream, ctypes.byref(graph))
        self.call("cuGraphInstantiateWithFlags", ctypes.byref(exe), graph, ctypes.c_ulonglong(0))
        self.lib.cuGraphDestroy(graph)
        return exe

    def launch(self, exe) -> None:
        self.call("cuGraphLaunch", exe, self.stream)

    def destroy_graph(self, exe) -> None:
        if exe:
            self.lib.cuGraphExecDestroy(exe)

    def close(self) -> None:
        if getattr(self, "stream", None):
            self.lib.cuStreamDestroy_v2(self.stream)
            self.stream = None
        if getattr(self, "ctx", None):
            self.lib.cuDevicePrimaryCtxRelease_v2(self.device)
            self.ctx = None
