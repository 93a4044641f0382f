"""Native CPU kernels: C sources shipped with the package, compiled once per machine, loaded by ctypes.

The PyTorch path on CPU runs each op as several whole-tensor passes (codes, packing, a finite
check...). The C kernels in ``csrc/`` fuse them into one pass over memory each. They need no
torch headers, so a build takes about a second with the system's C compiler; the shared library
is cached per source, compiler and CPU, and every later process loads it in milliseconds.

Threads come from torch's own OpenMP runtime: torch loads its ``libgomp.so.1`` first and the
library's ``libgomp.so.1`` dependency resolves to it, so both share one pool of threads. Where
torch uses no libgomp (other platforms, other builds) the kernels are built single-threaded.

Where no C compiler works, :func:`native_available` says why and the ops keep their PyTorch
path. ``APPROXBP_NATIVE_CACHE`` moves the cache (default ``~/.cache/lightning_approxbp``);
``APPROXBP_CC`` picks the compiler (default ``cc``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = ("step_activation.c", "ms_norm.c", "dropout.c")
HEADERS = ("dtypes.h",)
NATIVE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", "-fno-math-errno")


class NativeUnavailable(RuntimeError):
    """The native CPU kernels cannot be built or loaded here (the message says why)."""


def _torch_uses_libgomp() -> bool:
    """Whether torch's OpenMP runtime is a loaded ``libgomp.so.1`` (so ours resolves to it).

    Some wheels ship it renamed (``libgomp-<hash>.so.1``): our dependency would then load a
    second runtime whose idle threads spin against torch's, so the kernels are built serial.
    """
    try:
        with open("/proc/self/maps") as maps:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in maps)
    except OSError:
        return False


def _cpu_signature() -> str:
    """The CPU's feature flags: ``-march=native`` code is valid only where they match."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str:
    return os.environ.get("APPROXBP_CC", "cc")


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_approxbp"
    return Path(os.environ.get("APPROXBP_NATIVE_CACHE", default))


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeUnavailable(f"no working C compiler {compiler!r} ({error}); set APPROXBP_CC to one") from error


def _build(threaded: bool) -> Path:
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C compiler {compiler!r} on PATH; set APPROXBP_CC to one")
    # Single-threaded builds keep the ``omp simd`` loops vectorised.
    flags = (*_FLAGS, "-fopenmp" if threaded else "-fopenmp-simd")
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((SOURCE_DIR / name).read_bytes())
    for part in (_compiler_version(compiler), " ".join(flags), _cpu_signature()):
        digest.update(part.encode())
    directory = _cache_dir()
    target = directory / f"approxbp_native_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load half a file.
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *flags, *(str(SOURCE_DIR / name) for name in SOURCES), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise NativeUnavailable(f"building the native CPU kernels failed:\n{' '.join(command)}\n{result.stderr}")
        os.replace(built, target)
    return target


@cache
def _library() -> ctypes.CDLL | NativeUnavailable:
    """The loaded library, or the reason there is none (kept, so a failure is tried once)."""
    if os.name != "posix":
        return NativeUnavailable(f"native CPU kernels are built on POSIX systems only, not on {os.name}")
    try:
        library = ctypes.CDLL(str(_build(threaded=_torch_uses_libgomp())))
    except (NativeUnavailable, OSError, subprocess.SubprocessError) as error:
        log.info("lightning_approxbp: native CPU kernels unavailable, the PyTorch path runs: %s", error)
        return error if isinstance(error, NativeUnavailable) else NativeUnavailable(str(error))
    _declare(library)
    return library


def _declare(library: ctypes.CDLL) -> None:
    pointer, size, number = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in _DTYPE_SUFFIX.values():
        for bits in (1, 2, 4):
            codes = getattr(library, f"step_codes{bits}_{suffix}")
            codes.argtypes, codes.restype = [pointer, size, pointer, pointer, number], size
            backward = getattr(library, f"step_backward{bits}_{suffix}")
            backward.argtypes, backward.restype = [pointer, pointer, size, pointer, pointer, number], None
        dropout = getattr(library, f"dropout_forward_{suffix}")
        dropout.argtypes, dropout.restype = [pointer, pointer, size, ctypes.c_float, pointer, pointer, number], None
        dropout = getattr(library, f"dropout_backward_{suffix}")
        dropout.argtypes, dropout.restype = [pointer, pointer, size, ctypes.c_float, pointer, number], None
    suffixes = tuple(_DTYPE_SUFFIX.values())
    for grad in suffixes:
        for saved in suffixes:
            for result in suffixes:
                norm = getattr(library, f"ms_norm_backward_{grad}_{saved}_{result}")
                norm.argtypes = [pointer, pointer, pointer, size, size, pointer, pointer, pointer, number, pointer, pointer, pointer, number]
                norm.restype = None


def native_available() -> bool:
    """Whether the native CPU kernels are built and loaded (building them on first call)."""
    return not isinstance(_library(), NativeUnavailable)


def library() -> ctypes.CDLL:
    """The loaded library; raises :class:`NativeUnavailable` with the reason where there is none."""
    loaded = _library()
    if isinstance(loaded, NativeUnavailable):
        raise loaded
    return loaded


@cache
def kernel(name: str, *dtypes: torch.dtype) -> ctypes._CFuncPtr:
    """The C function ``{name}_{dtype suffixes}``, e.g. ``kernel("step_codes2", torch.bfloat16)``."""
    return getattr(library(), "_".join((name, *(_DTYPE_SUFFIX[dtype] for dtype in dtypes))))


def address(tensor: Tensor) -> int:
    """The data pointer a kernel reads or writes: the tensor must be a contiguous CPU tensor."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("native CPU kernels take contiguous CPU tensors")
    return tensor.data_ptr()


def threads() -> int:
    return torch.get_num_threads()
