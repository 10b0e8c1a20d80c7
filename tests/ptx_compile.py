"""Compile the CUDA kernels for a real GPU without one: NVVM turns them into PTX.

The simulator runs the kernels as Python, so it never types or lowers them; a kernel that
the simulator runs could still fail to compile on a GPU. This closes that gap where the
CUDA toolkit's NVVM and libdevice are installed (a GPU and its driver are not needed):

1. ``recording()`` (in the simulator process of the tests) notes every kernel launched
   (cooperative launches included) and the numba types of its arguments;
2. ``python tests/ptx_compile.py RECORD`` (two worker processes with the simulator off)
   rebuilds each kernel from its module (``fastcells_variant`` names the factory and its
   compile-time key), types and lowers it once, has NVVM emit PTX for each compute
   capability of :data:`CCS` (8.0, the A100; 9.0, the H100), and, where the toolkit has
   ``ptxas``, assembles each PTX and reports the registers and any spills.

Exit status 0: all compiled; 1: some failed (listed); 77: no NVVM or libdevice found.
The CUDA toolkit is looked up in ``$CUDA_HOME``, ``$CUDA_PATH``, the NVIDIA wheels
installed in this Python (``nvidia-nvvm`` and ``nvidia-cuda-nvcc``, which ``.[test]``
installs) and ``/usr/local/cuda*``.
"""
import contextlib
import glob
import os
import pickle
import sys

NO_NVVM = 77
#: The compute capabilities every kernel is compiled for (the last one also types it).
CCS = ((8, 0), (9, 0))
CC = CCS[-1]


# --------------------------------------------------------------------------- recording
def _kernel_key(kernel):
    """How the compile process finds the kernel: its factory and key, or its module name."""
    variant = getattr(kernel, "fastcells_variant", None)
    if variant is not None:
        return ("variant",) + tuple(variant)
    fn = kernel.fn
    return ("module", fn.__module__, fn.__name__)


@contextlib.contextmanager
def recording():
    """Within the block, every simulated kernel launch is noted; yields the set of
    ``(key, argument types)``."""
    import numba
    from numba.cuda.simulator import kernel as simk

    from fastcells.cuda import _simulator
    seen = set()
    real_call = simk.FakeCUDAKernel.__call__
    real_cooperative = _simulator.launch_cooperative

    def note(kernel, args):
        seen.add((_kernel_key(kernel), tuple(numba.typeof(a) for a in args)))

    def call(self, *args):
        if not self._device and simk._get_kernel_context() is None:
            note(self, args)
        return real_call(self, *args)

    def cooperative(kernel, blocks, threads, nshared, args):
        note(kernel, args)
        return real_cooperative(kernel, blocks, threads, nshared, args)

    simk.FakeCUDAKernel.__call__ = call
    _simulator.launch_cooperative = cooperative
    try:
        yield seen
    finally:
        simk.FakeCUDAKernel.__call__ = real_call
        _simulator.launch_cooperative = real_cooperative


# --------------------------------------------------------------------------- compiling
def _toolkit():
    """(libnvvm.so, libdevice.10.bc) of the first CUDA toolkit found, or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    roots += _wheel_roots()
    roots += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in filter(None, roots):
        nvvm = (glob.glob(os.path.join(root, "nvvm", "lib64", "libnvvm.so*"))
                + glob.glob(os.path.join(root, "lib*", "libnvvm.so*")))
        libdevice = glob.glob(os.path.join(root, "nvvm", "libdevice", "libdevice*.bc"))
        if nvvm and libdevice:
            return root, sorted(nvvm)[0], libdevice[0]
    return None


def _wheel_roots():
    """The toolkit folders of NVIDIA's Python wheels (``nvidia/cu13`` for CUDA 13,
    ``nvidia/cuda_nvcc`` for CUDA 12), newest first."""
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    roots = []
    for base in spec.submodule_search_locations:
        roots += sorted(glob.glob(os.path.join(base, "cu[0-9]*")), reverse=True)
        roots += [os.path.join(base, "cuda_nvcc")]
    return [r for r in roots if os.path.isdir(r)]


def _offline_numba(root, libnvvm, libdevice):
    """numba-cuda asks the driver for the device's compute capability and NVRTC for the
    supported ones before it compiles; neither is needed to produce PTX, so both answers
    are given here, and NVVM and libdevice are taken from the toolkit found."""
    os.environ["CUDA_HOME"] = root          # where numba-cuda finds libnvvm
    from numba.cuda import dispatcher
    from numba.cuda.cudadrv import libs, nvrtc, nvvm

    class Device:
        compute_capability = CC

    dispatcher.get_current_device = lambda: Device()
    nvrtc.get_supported_ccs = lambda: ((7, 5), (8, 0), (8, 6), (8, 9), CC)
    libs.get_libdevice = nvvm.get_libdevice = lambda: libdevice    # nvvm imported it by name


def _rebuild(key):
    import importlib
    mod = importlib.import_module(key[1])
    if key[0] == "variant":
        made = getattr(mod, key[2])(*key[3])
        return made[key[4]] if isinstance(made, tuple) else made
    return getattr(mod, key[2])


def _ptx(pyfunc, sig):
    """The PTX of the kernel ``pyfunc`` for each of :data:`CCS`: typed and lowered once,
    then emitted by NVVM for each compute capability."""
    from numba import cuda
    try:
        from numba.cuda.compiler import _compile_pyfunc_with_fixup as build
    except ImportError:                 # another numba-cuda: one full compile per target
        return [cuda.compile_ptx(pyfunc, sig, cc=cc)[0] for cc in CCS]
    lib, _ = build(pyfunc, sig, device=False, abi="numba", cc=CC)
    return [lib.get_asm_str(cc=cc) for cc in CCS]


def _assemble(ptxas, ptx, cc):
    """``(error, registers, spilled bytes)`` of assembling ``ptx`` for ``sm_<cc>``."""
    import re
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # -c: relocatable code (the grid barrier calls into cudadevrt, linked at load time)
        run = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-c", "-v", src, "-o",
                              os.path.join(d, "k.o")], capture_output=True, text=True)
    if run.returncode:
        return f"ptxas sm_{cc[0]}{cc[1]}: {run.stderr[-2000:]}", None, None
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", run.stderr)]
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)]
    return "", max(regs, default=0), sum(spills)


def _compile(record):
    """``(error, registers, spilled bytes)`` of ``record`` (key, signature): error is ''
    when NVVM compiled it for every target of :data:`CCS` and ptxas (where the toolkit has
    it) assembled each; registers and spills are the largest over the targets."""
    key, sig = record
    try:
        ptxes = _ptx(_rebuild(key).py_func, sig)
        assert all(".entry" in ptx for ptx in ptxes), "no kernel entry in the PTX"
        targets = [p.split(".target", 1)[1].split()[0] for p in ptxes]
        assert targets == [f"sm_{a}{b}" for a, b in CCS], targets
    except Exception as e:      # report every kernel, not the first failure only
        return f"{key} {sig}: {type(e).__name__}: {str(e)[:2000]}", None, None
    ptxas = os.path.join(os.environ["CUDA_HOME"], "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "", None, None
    regs = spill = 0
    for ptx, cc in zip(ptxes, CCS):
        err, r, s = _assemble(ptxas, ptx, cc)
        if err:
            return f"{key} {sig}: {err}", None, None
        regs, spill = max(regs, r), max(spill, s)
    return "", regs, spill


def _init_worker(found):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    _offline_numba(*found)


def main(path, workers=2):
    found = _toolkit()
    if found is None:
        print("no CUDA toolkit with NVVM and libdevice found")
        return NO_NVVM
    with open(path, "rb") as f:
        records = sorted(pickle.load(f), key=repr)
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, _init_worker, (found,)) as pool:
        results = pool.map(_compile, records, chunksize=1)
    failed = [err for err, _, _ in results if err]
    for f in failed:
        print("FAILED", f)
    targets = ", ".join(f"sm_{a}{b}" for a, b in CCS)
    print(f"{len(records) - len(failed)} of {len(records)} kernels compiled to PTX "
          f"({targets}) with {found[1]}")
    assembled = [(rec, regs, spill) for rec, (err, regs, spill) in zip(records, results)
                 if regs is not None]
    if not assembled:
        print(f"no ptxas in {found[0]}/bin: the PTX was not assembled")
    else:
        print(f"ptxas: {len(assembled)} assembled, at most "
              f"{max(r for _, r, _ in assembled)} registers per thread")
        for (key, _), regs, spill in assembled:
            if spill:
                print(f"SPILL {spill} bytes ({regs} registers): {key}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
