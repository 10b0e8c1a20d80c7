"""What a report records about the machine: CPU, cores, library versions, threads."""
import datetime
import importlib.metadata
import os
import platform
import sys

from .. import config

def _cpuinfo(path="/proc/cpuinfo"):
    """The fields of the first processor in ``/proc/cpuinfo`` ({} where there is none)."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_model(fields=None):
    fields = _cpuinfo() if fields is None else fields
    return fields.get("model name") or platform.processor() or platform.machine()


#: AMD's cores by (family, model range): "AMD EPYC" alone names machines whose rates differ
#: by 2-3x.
_AMD_CORES = [(25, range(0x00, 0x10), "Zen 3"), (25, range(0x20, 0x30), "Zen 3"),
              (25, range(0x40, 0x60), "Zen 3"), (25, range(0x10, 0x20), "Zen 4"),
              (25, range(0x60, 0x80), "Zen 4"), (25, range(0xA0, 0xB0), "Zen 4"),
              (26, range(0x00, 0x100), "Zen 5"), (23, range(0x00, 0x100), "Zen 2 or older")]


def cpu_identity(fields=None):
    """``{vendor, family, model, core, isa}`` of this CPU from ``/proc/cpuinfo``: the ISA
    level the kernels can use ("AVX2", "AVX-512", "AVX-512 + AMX", or the best SSE/AVX
    found) and, for AMD, the core generation (None where it is not known)."""
    fields = _cpuinfo() if fields is None else fields
    flags = set(fields.get("flags", "").split())

    def number(key):
        try:
            return int(fields.get(key, ""), 0)
        except ValueError:
            return None

    vendor, family, model = fields.get("vendor_id"), number("cpu family"), number("model")
    core = None
    if vendor == "AuthenticAMD":
        core = next((name for fam, models, name in _AMD_CORES
                     if fam == family and model in models), None)
    if "avx512f" in flags:
        isa = "AVX-512 + AMX" if "amx_tile" in flags else "AVX-512"
    elif "avx2" in flags:
        isa = "AVX2" + (" + FMA" if "fma" in flags else "")
    elif "avx" in flags:
        isa = "AVX"
    else:
        isa = "SSE" if flags else None
    return dict(vendor=vendor, family=family, model=model, core=core, isa=isa)


def describe_cpu(machine):
    """The CPU of a report's machine for a table header: the model name, then vendor,
    family, model, core and ISA where the report recorded them."""
    cpu = machine.get("cpu", "?")
    ident = machine.get("cpu_identity")
    if not ident:
        return cpu
    parts = [f"family {ident['family']} model {ident['model']}"
             if ident.get("family") is not None else None, ident.get("core"), ident.get("isa")]
    return f"{cpu} ({', '.join(p for p in parts if p)})"


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
    fields = _cpuinfo()
    info = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        cpu=_cpu_model(fields), cpu_identity=cpu_identity(fields), cores=os.cpu_count(),
        cores_usable=affinity,
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
