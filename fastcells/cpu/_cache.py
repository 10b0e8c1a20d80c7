"""Numba's on-disk kernel cache, invalidated by a change to any source the kernels compile.

Numba stamps a cached function with the modification time and size of the one file that
defines it. A kernel inlines code from other modules (the activations of ``_math.py``, the
products of ``_gemm.py``, the step helpers of ``_common.py``), so an edit there would leave
the cached machine code of every kernel that inlines it in use: a changed or broken
activation would not reach the kernels until the cache is emptied by hand.

The locators here stand in for Numba's own for the functions of ``fastcells.cpu``: the
cache lives where Numba would put it (``NUMBA_CACHE_DIR``, the package's ``__pycache__``
folders, or the per-user cache), and the stamp is a digest of all of :data:`SOURCES`. Any
change to one of them makes every kernel's cache entry stale, and the kernel is compiled
again on its next use (and cached again).
"""
import functools
import glob
import hashlib
import os

from numba.core import caching

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The files whose code the CPU kernels compile: the kernels' own modules and what they
#: inline from the package (the activations and the compile-time settings).
SOURCES = tuple(sorted(glob.glob(os.path.join(_PACKAGE, "cpu", "*.py")))) + tuple(
    os.path.join(_PACKAGE, name) for name in ("_math.py", "config.py"))


def _stat_key(paths):
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append((p, st.st_mtime_ns, st.st_size))
        except OSError:
            stats.append((p, None, None))
    return tuple(stats)


@functools.lru_cache(maxsize=8)
def _digest(stats):
    h = hashlib.sha256()
    for path, _, _ in stats:
        h.update(os.path.basename(path).encode() + b"\0")
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"<missing>")
    return h.hexdigest()


def sources_digest():
    """The digest of :data:`SOURCES` as they are on disk now (computed again when a file's
    modification time or size changes)."""
    return _digest(_stat_key(SOURCES))


def _is_kernel(py_func):
    return (getattr(py_func, "__module__", "") or "").startswith("fastcells.cpu.")


def _keyed(base):
    """``base`` (one of Numba's locators) for the functions of ``fastcells.cpu``, stamped
    with :func:`sources_digest` besides the defining file's own stamp."""

    class Keyed(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            if not _is_kernel(py_func):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return (super().get_source_stamp(), sources_digest())

    Keyed.__name__ = Keyed.__qualname__ = "Fastcells" + base.__name__.lstrip("_")
    return Keyed


def _numba(name):
    """A class of ``numba.core.caching`` (named with a leading underscore before 0.61)."""
    return getattr(caching, name, None) or getattr(caching, "_" + name)


#: Numba's file-backed locators, in its own order of preference, keyed by the sources.
LOCATORS = tuple(_keyed(_numba(name)) for name in ("UserProvidedCacheLocator",
                                                   "InTreeCacheLocator",
                                                   "UserWideCacheLocator"))


def install():
    """Put :data:`LOCATORS` ahead of Numba's own (once; before the kernels are defined, as
    Numba picks a function's locator when ``njit(cache=True)`` wraps it)."""
    classes = _numba("CacheImpl")._locator_classes
    if not any(c in classes for c in LOCATORS):
        classes[:0] = LOCATORS
