"""Serve one allocation of an op from a given buffer: for ops that have no kernel writing into it.

oneDNN's convolution has no binding that writes into a given tensor without reading it (the
in-place one adds into its destination, so the destination must be zeroed first: a whole extra
pass over every output, 5-8% of a large convolution's time, measured). The functional op
allocates its output through c10's CPU allocator; `slot_allocator.cpp` wraps that allocator so
that a thread can *arm* a slot (pointer, bytes) and the op's first allocation of exactly that
size on that thread is the slot. The caller then checks that the result landed there.

The wrapper is compiled on first use with the system C++ compiler against torch's own headers
and libc10 (about a second), cached under `$MEMTILE_CACHE` (default `~/.cache/memtile`, else a
temporary folder), and installed once per process; every other allocation goes on to the
allocator that was in place, with its profiler reporting. Without a compiler, or with
`MEMTILE_SLOT_ALLOCATOR=0`, nothing is installed and `load()` says why (convolutions then zero
their destination, linear layers stay on `addmm`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("slot_allocator.cpp")
DISABLE = "MEMTILE_SLOT_ALLOCATOR"


def _cache_dirs() -> list[Path]:
    """Where the build is kept: `$MEMTILE_CACHE`, else the user cache, else a temporary folder
    (a read-only home must not cost the fast path)."""
    if "MEMTILE_CACHE" in os.environ:
        return [Path(os.environ["MEMTILE_CACHE"])]
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memtile"
    return [user, Path(tempfile.gettempdir()) / f"memtile-{os.getuid()}"]


def _build() -> Path:
    """The compiled wrapper for this source and this torch, compiled if not cached yet."""
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    digest = hashlib.sha256(SOURCE.read_bytes() + f"{torch.__version__} {abi}".encode())
    name = f"slot_allocator-{digest.hexdigest()[:16]}.so"
    cached = [folder / name for folder in _cache_dirs() if (folder / name).exists()]
    if cached:
        return cached[0]
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise OSError(f"no C++ compiler ({compiler!r}) to build the slot allocator")
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC",
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}", str(SOURCE),
               f"-L{torch_dir / 'lib'}", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}", "-o"]
    failures = []
    for folder in _cache_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(dir=folder))
        except OSError as error:
            failures.append(f"{folder}: {error.strerror}")
            continue
        try:
            done = subprocess.run([*command, str(scratch / name)], check=False,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise OSError(f"building the slot allocator failed: {done.stderr.strip()[-500:]}")
            os.replace(scratch / name, folder / name)  # atomic: a concurrent build sees all or none
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return folder / name
    raise OSError(f"no writable folder for the slot allocator build ({'; '.join(failures)})")


_library: ctypes.CDLL | None = None
_unavailable: str | None = None


def load() -> str | None:
    """Install the wrapper (once per process); None when it is in use, else why it is not."""
    global _library, _unavailable
    if _library is None and _unavailable is None:
        _library, _unavailable = _install()
    return _unavailable


def _install() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get(DISABLE) == "0":
        return None, f"disabled by {DISABLE}=0"
    try:
        library = ctypes.CDLL(str(_build()))
    except OSError as error:
        return None, str(error)
    library.memtile_slot_arm.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    library.memtile_slot_arm.restype = None
    library.memtile_slot_disarm.restype = None
    if not library.memtile_slot_install():
        return None, "another CPU allocator of higher priority is installed"
    return library, None


def call_into(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """`fn(*args)` with its output allocated in `out`, which must be dense and laid out as `fn`
    lays out its result (the caller's contract; the construction-time check compares values).
    Where something else took the slot first, the result is copied into `out` (the same check
    then sees the allocation and leaves the op unplanned). Only after `load()` returned None."""
    _library.memtile_slot_arm(out.data_ptr(), out.numel() * out.element_size())
    try:
        result = fn(*args)
    finally:
        _library.memtile_slot_disarm()
    return out if result.data_ptr() == out.data_ptr() else out.copy_(result)
