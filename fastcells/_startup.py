"""What ``python -m fastcells`` (and the ``fastcells`` console script) sets up before Keras is
imported. Standard library only: the package imports this first.

Keras picks its backend once, when it is imported, and the package imports Keras (through
the layers) before the command line parses its flags. On a machine without TensorFlow,
Keras's default backend cannot start and ``import fastcells`` would fail; ``bench --gpu``
compares against Keras on the torch backend. So for the command line, when
``KERAS_BACKEND`` is not set, :func:`command_line_backend` picks torch (or JAX) there.
Users' own processes are never touched.
"""
import importlib.util
import os


def is_command_line(argv):
    """True while ``python -m fastcells`` (runpy sets argv[0] to "-m" while it imports the
    package) or the ``fastcells`` console script starts."""
    first = argv[0] if argv else ""
    return first == "-m" or os.path.basename(first) in ("fastcells", "fastcells.exe")


#: Set in the environment of the processes that only compile kernels: ``import fastcells``
#: then imports the kernels and ``ops`` only, not the layers (nor Keras).
KERNELS_ONLY = "FASTCELLS_KERNELS_ONLY"


def kernels_only(environ=None):
    """True in a process started to compile kernels only (see :data:`KERNELS_ONLY`)."""
    return (os.environ if environ is None else environ).get(KERNELS_ONLY) == "1"


def module_found(name):
    """True when ``name`` is installed (found, not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


#: The Keras backends ``python -m fastcells bench --backend`` takes (and ``all``).
BACKENDS = ("tensorflow", "torch", "jax")


def backend_flag(argv):
    """The value of ``--backend`` in ``argv`` (``--backend X`` or ``--backend=X``), or None."""
    args = list(argv[1:])
    for i, a in enumerate(args):
        if a == "--backend" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--backend="):
            return a.split("=", 1)[1]
    return None


def command_line_backend(argv, environ=None, found=None):
    """The Keras backend the command line should use, or None to leave Keras's choice.

    argv: the command line; environ: the environment (``os.environ``); found: a function
    telling whether a module is installed (``importlib.util.find_spec`` by default).

    - ``--backend tensorflow|torch|jax`` in argv: that backend (the flag is the user's
      latest word, over ``KERAS_BACKEND``);
    - ``KERAS_BACKEND`` set: None (the user's choice stands);
    - ``--gpu`` in argv: "torch" (the GPU comparison runs the built-in layers on torch);
    - TensorFlow not installed: "torch", else "jax", where installed.

    Example::

        command_line_backend(["-m", "bench", "--gpu"], {})       # "torch"
    """
    environ = os.environ if environ is None else environ
    found = module_found if found is None else found
    flag = backend_flag(argv)
    if flag in BACKENDS:
        return flag
    if environ.get("KERAS_BACKEND"):
        return None
    if "--gpu" in argv[1:] and found("torch"):
        return "torch"
    if found("tensorflow"):
        return None
    for backend in ("torch", "jax"):
        if found(backend):
            return backend
    return None


def setup_command_line(argv, environ=None):
    """Quieten TensorFlow's C++ logging and choose the Keras backend (see above)."""
    environ = os.environ if environ is None else environ
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    backend = command_line_backend(argv, environ)
    if backend is not None:
        environ["KERAS_BACKEND"] = backend
