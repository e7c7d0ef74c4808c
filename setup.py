"""Build script.

The compiled extension is one shared library per op (``ddfast._C_<op>``), so a broken or
unbuildable op never takes the others down. It is built here, ahead of time, when torch and a
C++ compiler are present (CUDA sources only when torch has CUDA and nvcc is found); otherwise
ddfast compiles it on first use (see ddfast/_extension.py). A failed build here is a warning,
never a failed install.

Install without build isolation so the extension is built against the torch you run:
    pip install --no-build-isolation -e .
Set DDFAST_NO_EXTENSION=1 to skip the ahead-of-time build.
"""
import copy
import glob
import os
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["ddfast", "ddfast.ops", "ddfast.compat", "ddfast.examples", "ddfast.kernels", "ddfast.bench", "ddfast.bench.cases",
            "ddfast.csrc"]
PACKAGE_DIR = {"ddfast": "ddfast", "ddfast.kernels": "kernels", "ddfast.bench": "bench", "ddfast.csrc": "csrc"}
PACKAGE_DATA = {"ddfast.csrc": ["*.cpp", "*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"], "ddfast.bench": ["results/*.json"]}


def _extensions():
    if os.environ.get("DDFAST_NO_EXTENSION", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch absent at build time: ddfast compiles on first use instead
        warnings.warn(f"ddfast: not building the extension ahead of time ({exc}); it will compile on first use")
        return [], {}

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("DDFAST_NO_CUDA") != "1"
    # at::parallel_for is OpenMP in torch's CPU builds; its pragmas need -fopenmp here too
    common_flags = {"cxx": ["-O3", "-fopenmp"]}
    if with_cuda:
        common_flags["nvcc"] = ["-O3", "-lineinfo"]  # no fast math: fp32 parity with the reference
    exts = []
    for cpp in sorted(glob.glob(os.path.join("csrc", "*.cpp"))):
        op = os.path.splitext(os.path.basename(cpp))[0]
        cu = os.path.join("csrc", "cuda", op + ".cu")
        sources = [cpp]
        kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args=dict(common_flags),
                      extra_link_args=["-fopenmp"])
        if with_cuda and os.path.exists(cu):
            sources.append(cu)
            kwargs["define_macros"] = [("DDFAST_WITH_CUDA", "1")]
            exts.append(CUDAExtension(f"ddfast._C_{op}", sources, **kwargs))
        else:
            kwargs["extra_compile_args"] = {"cxx": common_flags["cxx"]}
            exts.append(CppExtension(f"ddfast._C_{op}", sources, **kwargs))

    class TolerantBuildExtension(BuildExtension):
        """Builds every op it can, several at once; a failing op is a warning and is compiled on
        first use instead."""

        def finalize_options(self):
            super().finalize_options()
            if not self.parallel:  # one op per core unless -j says otherwise
                self.parallel = max(1, min(len(self.extensions), os.cpu_count() or 1))

        def build_extensions(self):
            self._ddfast_failed = set()
            super().build_extensions()
            # drop failed ops so the copy/install steps do not look for their libraries
            self.extensions = [e for e in self.extensions if e.name not in self._ddfast_failed]

        def build_extension(self, ext):
            # torch's ninja build writes build.ninja into build_temp: ops built at once in one folder
            # overwrote each other's and linked missing objects (seen with -j 8 on an H200 machine).
            # Each op builds in its own folder, through its own shallow copy of this command.
            worker = copy.copy(self)
            worker.build_temp = os.path.join(self.build_temp, ext.name)
            try:
                super(TolerantBuildExtension, worker).build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure must not fail the install
                self._ddfast_failed.add(ext.name)
                warnings.warn(f"ddfast: building {ext.name} failed ({exc}); it will be compiled on first use")

    return exts, {"build_ext": TolerantBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
