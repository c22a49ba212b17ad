"""CUDA C++ kernels compiled at run time: NVRTC (which every CUDA build of torch loads) turns source
into a cubin for the GPU at hand, and the driver API launches it on torch's current stream — all
through ctypes, so no compiler, toolkit or build step is needed at install time.

torch has a private helper for this (``torch.cuda._compile_kernel``), but it insists on a CUDA
toolkit's include directory (``CUDA_HOME``) even for source that includes nothing, which a pip
install of torch does not have.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from functools import lru_cache

import torch


def compile_cubin(source: str, name: str, capability: tuple[int, int]) -> bytes:
    """Machine code of ``source`` for compute capability ``capability`` (its own instructions, no PTX
    left for the driver to compile); the compiler's log in the error if it fails."""
    nvrtc = _nvrtc()
    program = ctypes.c_void_p()
    _check_nvrtc(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(), 0, None, None))
    try:
        options = [f"--gpu-architecture=sm_{capability[0]}{capability[1]}".encode(), b"--std=c++17"]
        result = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        if result != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC could not compile {name} for sm_{capability[0]}{capability[1]}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin))
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


class Kernel:
    """One ``extern "C"`` kernel of a cubin, loaded on the current device; called with tensors (passed
    as device pointers) and Python ints (as C ``int``), on torch's current stream."""

    def __init__(self, cubin: bytes, name: str) -> None:
        if not torch.cuda.is_current_stream_capturing():  # (a capture has made the context current already)
            torch.cuda.synchronize()  # a runtime call: makes torch's context of the current device current on this thread
        driver = _driver()
        self._module, self._function = ctypes.c_void_p(), ctypes.c_void_p()
        _check_driver(driver.cuModuleLoadData(ctypes.byref(self._module), cubin))
        _check_driver(driver.cuModuleGetFunction(ctypes.byref(self._function), self._module, name.encode()))

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], *args: torch.Tensor | int) -> None:
        values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        _check_driver(_driver().cuLaunchKernel(self._function, *grid, *block, 0, stream, pointers, None))


@lru_cache(maxsize=1)
def version() -> tuple[int, int]:
    """NVRTC's (major, minor): which PTX it can compile."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check_nvrtc(_nvrtc(), _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
    return major.value, minor.value


@lru_cache(maxsize=1)
def nvrtc_available() -> bool:
    """Whether NVRTC loads (CUDA builds of torch bring it)."""
    try:
        _nvrtc()
    except OSError:
        return False
    return True


@lru_cache(maxsize=1)
def _nvrtc() -> ctypes.CDLL:
    """The NVRTC of torch's CUDA version: already loaded by a CUDA torch, else found in the nvidia wheels."""
    major = (torch.version.cuda or "").split(".")[0]
    names = [f"libnvrtc.so.{major}", "libnvrtc.so"] if major else ["libnvrtc.so"]
    for directory in sys.path:  # pip's nvidia-cuda-nvrtc wheel: nvidia/cu13/lib or nvidia/cuda_nvrtc/lib
        names += sorted(glob.glob(os.path.join(directory, "nvidia", "*", "lib", "libnvrtc.so*")))
    for name in names:
        try:
            for builtins in sorted(glob.glob(os.path.join(os.path.dirname(name), "libnvrtc-builtins.so.*"))):
                ctypes.CDLL(builtins)  # found by its file name, it is not on the loader's path: NVRTC opens it by soname
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("NVRTC (libnvrtc) was not found: it comes with CUDA builds of torch (the nvidia-cuda-nvrtc package)")


@lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check_nvrtc(nvrtc: ctypes.CDLL, result: int) -> None:
    if result != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC error: {nvrtc.nvrtcGetErrorString(result).decode()}")


def _check_driver(result: int) -> None:
    if result != 0:
        message = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(message))
        raise RuntimeError(f"CUDA driver error {result}: {(message.value or b'unknown').decode()}")
