"""Where a ``fastcells.ops`` call spends its time, by compiled function, sampled with Linux
``perf`` (docs/performance.md, "What limits each workload").

    python benchmarks/profile_kernels.py lstm train [--batch 128 --time 500 --features 32
        --units 32 --dtype float32 --calls 50 --return-sequences]

The kernels are compiled in this process (into a temporary cache, so Numba keeps their
LLVM modules) and their addresses written to ``/tmp/perf-<pid>.map``, where ``perf report``
finds the names of JIT-compiled code. The call is timed without the profiler first; the
table gives each group's share of the samples and that share of the unprofiled time:

- ``products``: ``_gemm.packed_dot``, the products against packed weights in the steps
- ``BLAS``: the library GEMMs around the recurrence (input projection, weight gradients)
- ``<kernel>``: the rest of each recurrence kernel (activations, cell update, gradients,
  copies, and the loads that wait for memory)
- ``reference counts``: Numba's runtime counting the views the kernels take of arrays
- ``Python and NumPy``: the op's own Python, NumPy and the thread hand-offs
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time


def readable(symbol):
    """``fastcells.cpu.lstm._forward_kernel`` for Numba's mangled ``_ZN9fastcells3cpu4lstm
    15_forward_kernelB2v5...`` (the text itself for any other symbol)."""
    if not symbol.startswith("_ZN"):
        return symbol
    parts, i = [], 3
    while i < len(symbol) and symbol[i].isdigit():
        j = i
        while symbol[j].isdigit():
            j += 1
        n = int(symbol[i:j])
        parts.append(symbol[j:j + n])
        i = j + n
    return ".".join(parts) or symbol


def group(symbol):
    """The group of a ``perf report`` symbol (see the module docstring)."""
    name = readable(symbol)
    if name.endswith("packed_dot"):
        return "products"
    if re.search(r"gemm_|gemv_|_kernel_(HASWELL|SKYLAKEX|ZEN|SANDYBRIDGE|NEOVERSE)|itcopy|"
                 r"oncopy|otcopy|incopy|mkl_blas", name):
        return "BLAS"
    if name.startswith("NRT_"):
        return "reference counts"
    if name.startswith("fastcells."):
        return name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
    return "Python and NumPy"


def parse_report(text):
    """{group: share} from the lines of ``perf report --no-children --sort sym``
    (``  12.34%  [.] symbol``), shares in [0, 1]."""
    shares = {}
    for line in text.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+\[[.k]\]\s+(\S+)", line)
        if m:
            g = group(m.group(2))
            shares[g] = shares.get(g, 0.0) + float(m.group(1)) / 100.0
    return shares


def write_perf_map(path):
    """Write the address, size and name of every function compiled for fastcells'
    kernels in this process to ``path`` (the format of ``/tmp/perf-<pid>.map``); returns
    how many. Kernels loaded from Numba's cache have no module to list: compile them here."""
    from numba.core.registry import CPUDispatcher
    found, seen = {}, set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("fastcells"):
            continue
        for value in list(vars(module).values()):
            d = getattr(value, "dispatcher", value)
            if not isinstance(d, CPUDispatcher) or id(d) in seen:
                continue
            seen.add(id(d))
            for cres in list(d.overloads.values()):
                lib = cres.library
                llvm_module = getattr(lib, "_final_module", None)
                if llvm_module is None:
                    continue
                for fn in llvm_module.functions:
                    if fn.is_declaration:
                        continue
                    try:
                        address = lib.get_pointer_to_function(fn.name)
                    except Exception:   # a function LLVM did not keep
                        continue
                    if address:
                        found[address] = fn.name
    items = sorted(found.items())
    with open(path, "w") as f:
        for k, (address, fname) in enumerate(items):
            end = items[k + 1][0] if k + 1 < len(items) else address + (1 << 16)
            f.write(f"{address:x} {min(end - address, 1 << 20):x} {fname}\n")
    return len(items)


def make_call(args):
    import numpy as np
    from fastcells import ops
    G = {"lstm": 4, "gru": 3, "simple_rnn": 1}[args.cell]
    B, T, D, H = args.batch, args.time, args.features, args.units
    rng = np.random.default_rng(0)
    dt = np.dtype(args.dtype)
    x = rng.standard_normal((B, T, D)).astype(dt)
    W = (rng.standard_normal((D, G * H)) / np.sqrt(D)).astype(dt)
    U = (rng.standard_normal((H, G * H)) / np.sqrt(H)).astype(dt)
    b = (rng.standard_normal((2, 3 * H) if args.cell == "gru" else (G * H,)) * 0.1).astype(dt)
    forward = getattr(ops, args.cell + "_forward")
    backward = getattr(ops, args.cell + "_backward")
    rs = args.return_sequences

    def call():
        fwd = forward(x, W, U, b, training=args.mode == "train", return_sequences=rs)
        if args.mode == "train":
            backward(fwd.cache, np.ones_like(fwd.outputs))
    return call


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cell", choices=["lstm", "gru", "simple_rnn"])
    ap.add_argument("mode", choices=["inference", "train"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--time", type=int, default=500)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--return-sequences", action="store_true")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--frequency", type=int, default=4000, help="perf samples per second")
    args = ap.parse_args()

    cache = tempfile.mkdtemp(prefix="fastcells-profile-")
    os.environ["NUMBA_CACHE_DIR"] = cache           # compile here: see write_perf_map
    os.environ["FASTCELLS_BACKGROUND_COMPILE"] = "0"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    call = make_call(args)
    call()
    call()
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    ms = times[len(times) // 5] * 1e3               # the 20th percentile: noise only adds
    n = write_perf_map(f"/tmp/perf-{os.getpid()}.map")
    data = os.path.join(cache, "perf.data")
    perf = subprocess.Popen(["perf", "record", "-q", "-F", str(args.frequency), "-p",
                             str(os.getpid()), "-o", data], stderr=subprocess.DEVNULL)
    time.sleep(1.0)                                 # perf attaches
    for _ in range(args.calls):
        call()
    perf.send_signal(signal.SIGINT)
    perf.wait()
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym"],
                            capture_output=True, text=True).stdout
    shares = parse_report(report)
    total = sum(shares.values()) or 1.0
    print(f"{args.cell} {args.mode} B={args.batch} T={args.time} D={args.features} "
          f"H={args.units} {args.dtype}: {ms:.2f} ms per call ({n} compiled functions mapped)")
    for g, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        if share >= 0.005:
            print(f"  {g:40s} {100 * share / total:5.1f}%  {ms * share / total:7.2f} ms")


if __name__ == "__main__":
    main()
