"""Build fastjac and its optional C++/CUDA extension ``fastjac._C``.

The extension is built against the torch already installed (use ``pip install --no-build-isolation``:
an isolated build environment would fetch a torch of its own). Where torch has CUDA and nvcc exists it is
a CUDAExtension (the CPU ops plus the CUDA ops); otherwise, or when that build fails (e.g. nvcc's CUDA
major version differs from torch's), a CppExtension of the CPU ops alone, so a CUDA failure never costs
the ``cpp`` backend. A failed CPU build only warns: ``import fastjac`` works without the extension and
its tests skip with the reason. The last line of the build says which parts were built.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

# Triton kernels live in the top-level kernels/ folder (parallel to csrc/) and ship as fastjac.kernels.
PACKAGES = ["fastjac", "fastjac.ops", "fastjac.kernels"]
PACKAGE_DIR = {"fastjac.kernels": "kernels"}


def _say(message: str) -> None:
    print(f"fastjac: {message}", file=sys.stderr, flush=True)


def _warn_on_static_libstdcxx(paths) -> None:
    """Warn when a built extension carries its own static copy of libstdc++ (``ldd`` lists no shared one):
    its first C++ error then crashes the process instead of raising (the message is formatted by that
    copy's iostreams). Seen on a GPU image whose CXX, /opt/gcc/bin/g++, was not the GCC torch was built
    with (``torch.__config__.show()`` names it)."""
    ldd = shutil.which("ldd")
    if ldd is None or not sys.platform.startswith("linux"):
        return
    for path in paths:
        listing = subprocess.run([ldd, path], capture_output=True, text=True).stdout
        if listing and "libstdc++" not in listing:
            _say(f"WARNING: {path} links no shared libstdc++ (the C++ compiler {os.environ.get('CXX', 'c++')!r} "
                 "linked a static copy): its first C++ error will crash the process instead of raising. Rebuild "
                 "with the compiler torch was built with (see torch.__config__.show()), e.g. CXX=g++ CC=gcc.")


def _extension_and_cmdclass():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not installed; building without the C++ extension")
        return [], {}

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]

    def cpu_extension():
        return CppExtension("fastjac._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])

    def cuda_extension():
        return CUDAExtension(
            "fastjac._C",
            cpp_sources + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("FASTJAC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )

    want_cuda = os.environ.get("FASTJAC_NO_CUDA") != "1"
    if not want_cuda:
        why_not_cuda = "FASTJAC_NO_CUDA=1"
    elif torch.version.cuda is None:
        why_not_cuda = "torch has no CUDA"
    elif shutil.which("nvcc") is None:
        why_not_cuda = "nvcc is not on PATH"
    else:
        why_not_cuda = None

    class OptionalBuildExtension(BuildExtension):
        """Build the CUDA extension, falling back to the CPU ops alone if it fails; warn instead of
        failing when even that fails: the package must install and import without its extension."""

        def run(self):
            if why_not_cuda is None:
                try:
                    super().run()
                    _warn_on_static_libstdcxx(self.get_outputs())
                    _say("built fastjac._C: CPU ops and CUDA ops (backends 'cpp' and 'cuda')")
                    return
                except Exception as error:  # noqa: BLE001 - any nvcc/compiler failure: keep the CPU ops
                    _say(f"WARNING: the CUDA extension failed to build ({error}); building the CPU ops alone")
                # The same Extension object (setuptools finalized it) becomes the CPU build: sources,
                # macros, paths and flags of cpu_extension(); a fresh compiler (run() left an object).
                for name, value in vars(cpu_extension()).items():
                    if not name.startswith("_"):
                        setattr(self.extensions[0], name, value)
                self.compiler = None
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure must not block install
                _say(f"WARNING: the C++ extension failed to build ({error}); backends 'cpp' and 'cuda' "
                     "are unavailable")
                return
            _warn_on_static_libstdcxx(self.get_outputs())
            reason = "the CUDA build failed, see above" if why_not_cuda is None else why_not_cuda
            _say(f"built fastjac._C: CPU ops only (backend 'cpp'; no 'cuda': {reason})")

    extension = None
    if why_not_cuda is None:
        try:
            extension = cuda_extension()
        except Exception as error:  # noqa: BLE001 - e.g. no CUDA_HOME: build the CPU ops alone
            why_not_cuda = f"the CUDA extension could not be set up: {error}"
            _say(f"WARNING: {why_not_cuda}")
    extension = extension or cpu_extension()
    # BuildExtension compiles with ninja when it is on PATH (scripts/setup.sh installs it): MAX_JOBS files at once
    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extension_and_cmdclass()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
