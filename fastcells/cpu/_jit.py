"""``njit`` for the kernels that Python calls, with an on-disk cache that cannot break a call.

Numba loads its cache index with ``pickle`` and does not guard against a corrupt or
truncated file: an overwritten index file makes every later call raise
``UnpicklingError``. A kernel made here drops its cache index when a call fails for any
reason other than a typing error, warns once, recompiles, and retries once (a real error
comes back from the retry).
"""
import functools
import warnings

from numba import njit
from numba.core.errors import TypingError

from .. import config


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


def kernel(fn):
    """``numba.njit`` with ``config.NJIT_OPTIONS`` and a cache that cannot break a call."""
    return CacheSafe(njit(**config.NJIT_OPTIONS)(fn))
