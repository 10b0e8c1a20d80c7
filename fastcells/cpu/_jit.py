"""``njit`` for the kernels that Python calls, with an on-disk cache that cannot break a call.

Numba loads its cache index with ``pickle`` and does not guard against a corrupt or
truncated file: an overwritten index file makes every later call raise
``UnpicklingError``. A kernel made here drops its cache index when a call fails for any
reason other than a typing error, warns once, recompiles, and retries once (a real error
comes back from the retry).

The first time a process compiles a kernel (nothing for it in the cache yet), it says so
once, on the "fastcells" logger: a first call then takes tens of seconds, and
``python -m fastcells warmup`` compiles everything ahead of time. A forward kernel that
starts compiling inside a training call also starts the compilation of the backward kernels
in a second process (``fastcells._coldstart``).
"""
import functools
import logging
import threading
import warnings

from numba import njit
from numba.core import event
from numba.core.errors import TypingError

from .. import config
from . import _cache

_cache.install()          # before any kernel is defined: the cache keyed by all its sources


_log = logging.getLogger("fastcells")


class _CompileNotice(event.Listener):
    """Logs one line the first time a fastcells kernel is compiled in this process (Numba
    sends "numba:compile" only for a real compilation, not for a load from the cache)."""

    def __init__(self):
        self.said = False
        self._lock = threading.Lock()

    def on_start(self, ev):
        func = getattr(ev.data.get("dispatcher"), "py_func", None)
        module = getattr(func, "__module__", "") or ""
        if not module.startswith("fastcells."):
            return
        if module.startswith("fastcells.cpu.") and func.__name__.startswith("_forward"):
            from .. import _coldstart
            _coldstart.forward_compiling()
        if self.said or not config.COMPILE_NOTICE:
            return
        with self._lock:
            if self.said:
                return
            self.said = True
        from ..warmup import cache_location
        _log.warning("fastcells: compiling CPU kernels that are not in the kernel cache "
                     "yet (tens of seconds per cell and dtype, once; cached in %s). "
                     "`python -m fastcells warmup` compiles them all ahead of time.",
                     cache_location())

    def on_end(self, ev):
        pass


_notice = _CompileNotice()
event.register("numba:compile", _notice)


class CacheSafe:
    """A cached ``njit`` dispatcher whose broken cache entries are dropped and rebuilt."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        functools.update_wrapper(self, dispatcher.py_func)

    def __call__(self, *args):
        try:
            return self.dispatcher(*args)
        except TypingError:
            raise
        except Exception as exc:
            cache = getattr(self.dispatcher, "_cache", None)
            if cache is None:
                raise
            try:
                cache.flush()
            except Exception:  # nothing more to drop; the retry says what is wrong
                pass
            warnings.warn(f"fastcells: the compiled-kernel cache of {self.__qualname__} could "
                          f"not be used ({type(exc).__name__}: {exc}); it was cleared and the "
                          f"kernel recompiled", RuntimeWarning, stacklevel=2)
            return self.dispatcher(*args)


def called(fn):
    """``numba.njit`` for a helper that kernels call rather than inline: it is compiled once
    per argument types (an inlined helper is compiled again at every call site, which is
    what makes a large kernel slow to compile), for work large enough that a call costs
    nothing next to it. Not cached on its own: its code is cached inside every kernel that
    calls it, and a damaged cache file of its own would break the compilation of those
    kernels."""
    return njit(**dict(config.NJIT_OPTIONS, cache=False))(fn)


def kernel(fn):
    """``numba.njit`` with ``config.NJIT_OPTIONS`` and a cache that cannot break a call."""
    return CacheSafe(njit(**config.NJIT_OPTIONS)(fn))
