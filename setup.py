from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
for line in (here / "fastcells" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="fastcells",
    version=version["__version__"],
    description="Numba-JITted LSTM, GRU and SimpleRNN kernels (CPU and CUDA) behind drop-in "
                "Keras 3 layers",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastcells", "fastcells.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "numba>=0.59",
        "scipy>=1.10",          # numba's np.dot inside kernels calls BLAS through scipy
        "keras>=3.10",
        "threadpoolctl>=3.1",   # BLAS held to one thread inside the batch-parallel kernels
    ],
    extras_require={
        "tf": ["tensorflow>=2.16"],
        "torch": ["torch>=2.1"],
        "jax": ["jax>=0.4.30"],
        "cuda": ["numba-cuda>=0.10"],
        "test": ["tensorflow-cpu>=2.16", "pytest>=7", "pytest-benchmark>=4", "hypothesis>=6",
                 "pytest-xdist>=3.5",      # the suite runs on two workers (README)
                 "numba-cuda>=0.10",       # the CUDA kernels run under its simulator
                 # NVVM, libdevice and ptxas: every CUDA kernel is compiled for real GPU
                 # targets in the tests (no GPU needed)
                 "nvidia-nvvm", "nvidia-cuda-nvcc",
                 "jax>=0.4.30",            # the JAX backend tests
                 "ruff==0.17.6"],          # the linter .ci/run runs (ruff.toml)
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fastcells=fastcells.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
