"""What a report records about the machine: CPU, cores, library versions, threads."""
import datetime
import importlib.metadata
import os
import platform
import sys

from .. import config

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Distributions whose versions the report records, by name (several for one name: the
#: first installed one).
_DISTRIBUTIONS = {"numpy": ("numpy",), "numba": ("numba",), "numba-cuda": ("numba-cuda",),
                  "tensorflow": ("tensorflow", "tensorflow-cpu"), "keras": ("keras",),
                  "torch": ("torch",), "jax": ("jax",)}


def _version(name):
    """The installed version of ``name``, without importing it (importing torch here would
    put its threads next to the engines measured in this process); None when missing."""
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except Exception:  # not installed under this name
            continue
    return None


def machine_info():
    """CPU, core count, library versions and the fastcells configuration of this machine."""
    import fastcells
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    info = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        cpu=_cpu_model(), cores=os.cpu_count(), cores_usable=affinity,
        platform=platform.platform(), python=platform.python_version(),
        versions={m: _version(m) for m in _DISTRIBUTIONS},
        fastcells=dict(version=fastcells.__version__,
                       num_threads=getattr(config, "NUM_THREADS", None),
                       config={k: getattr(config, k) for k in dir(config) if k.isupper()}),
    )
    try:
        if "tensorflow" not in sys.modules:     # not loaded by this run: not imported here
            raise ImportError("tensorflow")
        tf = sys.modules["tensorflow"]
        info["tensorflow_threads"] = dict(
            intra_op=tf.config.threading.get_intra_op_parallelism_threads(),
            inter_op=tf.config.threading.get_inter_op_parallelism_threads())
    except Exception:  # TensorFlow missing: nothing to record
        pass
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info
