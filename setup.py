"""Build fastjac and its optional C++/CUDA extension ``fastjac._C``.

The extension is built against the torch already installed (use ``pip install --no-build-isolation``:
an isolated build environment would fetch a torch of its own). It is a CUDAExtension where torch has
CUDA and nvcc exists, otherwise a CppExtension. A failed build only warns: ``import fastjac`` works
without the extension and its tests skip with the reason.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

# Triton kernels live in the top-level kernels/ folder (parallel to csrc/) and ship as fastjac.kernels.
PACKAGES = ["fastjac", "fastjac.ops", "fastjac.kernels"]
PACKAGE_DIR = {"fastjac.kernels": "kernels"}


def _extension_and_cmdclass():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastjac: torch is not installed; building without the C++ extension", file=sys.stderr)
        return [], {}

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    want_cuda = os.environ.get("FASTJAC_NO_CUDA") != "1"
    if want_cuda and torch.version.cuda is not None and shutil.which("nvcc") is not None:
        extension = CUDAExtension(
            "fastjac._C",
            cpp_sources + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("FASTJAC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension(
            "fastjac._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
        )

    class OptionalBuildExtension(BuildExtension):
        """Warn instead of failing: the package must install and import without its extension."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure must not block install
                print(f"fastjac: WARNING: the C++ extension failed to build ({error}); "
                      "the 'cpp' backend will be unavailable", file=sys.stderr)

    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extension_and_cmdclass()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
