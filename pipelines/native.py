"""C versions of the cleaning workers' hot loops (`pipelines/native.c`), built on first use.

Each C function gives bit for bit what a numpy function of `pipelines/` gives; that function stays
the reference (tests compare the two) and the fallback. The library is compiled once per machine
and source (`$CC` or `cc`, -O2, no machine-specific flags: a cache shared by different machines
stays valid), cached under the dsv3ray cache directory keyed by the source's hash, written
atomically (workers starting together may all compile; one file wins), and loaded with ctypes.
Without a C compiler, or with DSV3RAY_NATIVE=0, the numpy paths run (a warning says why, once per
process). A cluster image can build it ahead: `python -m pipelines.native`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import threading
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c99"]
_UNSET = object()
_lib = _UNSET
_lock = threading.Lock()
log = logging.getLogger(__name__)


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (numpy paths): built on the first call in a process."""
    global _lib
    if _lib is _UNSET:
        with _lock:
            if _lib is _UNSET:
                _lib = _load()
    return _lib


def _load() -> ctypes.CDLL | None:
    if os.environ.get("DSV3RAY_NATIVE", "1") == "0":
        return None
    try:
        path = build()
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("dsv3ray: the C helpers (%s) were not built (%s): the numpy paths run", SOURCE.name, e)
        return None
    lib = ctypes.CDLL(str(path))
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.minhash_signatures.argtypes = [i64, i64, i64, vp, vp, ctypes.c_uint64, vp, vp]
    lib.minhash_signatures.restype = ctypes.c_int
    lib.whitespace_runs.argtypes = [vp, i64, ctypes.c_uint8, vp]
    lib.whitespace_runs.restype = i64
    lib.fnv1a_runs.argtypes = [i64, vp, vp, vp, vp]
    lib.fnv1a_runs.restype = None
    return lib


def build() -> Path:
    """The compiled library's path, compiling it if this machine's cache has none yet."""
    from pipelines.quality import cache_dir

    cc = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, cc.encode(), " ".join(_FLAGS).encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    path = cache_dir() / f"native-{platform.system().lower()}-{key}.so"
    if path.is_file():
        return path
    part = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        done = subprocess.run(
            [cc, *_FLAGS, "-o", str(part), str(SOURCE)], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise subprocess.SubprocessError(f"{cc} exited {done.returncode}: {done.stderr.strip()[-300:]}")
        os.replace(part, path)  # atomic: a process loading it never sees half a file
    finally:
        part.unlink(missing_ok=True)
    return path


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def minhash_signatures(
    n: int, num_perm: int, s_S: np.ndarray, d_S: np.ndarray, salt: np.uint64, borrow_T: np.ndarray
) -> np.ndarray | None:
    """pipelines.dedup.MinHasher.signatures_from_shingles in C: (n, num_perm) uint32, or None
    when the library is not available (the caller's numpy path then)."""
    lib = library()
    if lib is None:
        return None
    if borrow_T.shape != (num_perm - 1, num_perm):
        raise ValueError(
            f"minhash_signatures: borrow_T of shape {borrow_T.shape}, not {(num_perm - 1, num_perm)}"
        )
    if d_S.size and (d_S.min() < 0 or d_S.max() >= n):  # (C writes where d_S points)
        raise IndexError(f"minhash_signatures: a shingle's document outside 0..{n - 1}")
    s_S = np.ascontiguousarray(s_S, dtype=np.uint64)
    d_S = np.ascontiguousarray(d_S, dtype=np.int64)
    borrow_T = np.ascontiguousarray(borrow_T, dtype=np.int16)
    out = np.empty((n, num_perm), dtype=np.uint32)
    if lib.minhash_signatures(
        n, num_perm, s_S.size, _ptr(s_S), _ptr(d_S), int(salt), _ptr(borrow_T), _ptr(out)
    ):
        raise MemoryError(f"minhash_signatures: no scratch memory for {n} x {num_perm} bins")
    return out


def whitespace_runs(joined: bytes, sep: int) -> bytes | None:
    """pipelines.clean._whitespace_runs in C (one pass instead of a dozen numpy ones), or None
    when the library is not available (the caller's numpy path then)."""
    lib = library()
    if lib is None:
        return None
    src = np.frombuffer(joined, dtype=np.uint8)
    out = np.empty(src.size, dtype=np.uint8)
    size = lib.whitespace_runs(_ptr(src), src.size, sep, _ptr(out))
    return out[:size].tobytes()


def fnv1a_runs(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """pipelines.ftpredict.fnv1a_runs in C (a loop per word instead of one numpy pass per byte
    position), or None when the library is not available (the caller's numpy path then)."""
    lib = library()
    if lib is None:
        return None
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    ends = np.ascontiguousarray(ends, dtype=np.int64)
    if starts.size and (starts.min() < 0 or ends.max() > buf.size or (ends < starts).any()):
        raise IndexError("fnv1a_runs: a run outside the buffer")  # (C reads there)
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    out = np.empty(starts.size, dtype=np.uint64)
    lib.fnv1a_runs(starts.size, _ptr(buf), _ptr(starts), _ptr(ends), _ptr(out))
    return out


if __name__ == "__main__":  # build ahead (a cluster image), and say where it went
    print(build())
