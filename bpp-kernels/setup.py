"""Builds the C++ extension bpp_kernels._C from csrc/ (everything else is in pyproject.toml).

Install from this folder with ``pip install --no-build-isolation -e .`` (or ``pip install
--no-build-isolation .`` for a regular install, a wheel or an sdist) so the build uses the torch
already installed (build isolation would download another torch). ``BPP_NO_EXT=1`` skips the
extension; a failed compile only warns: ``import bpp_kernels`` then uses the reference ops.
"""
import os
from glob import glob

from setuptools import setup

# the sources are named relative to this folder, as setuptools requires
os.chdir(os.path.dirname(os.path.abspath(__file__)))

ext_modules, cmdclass = [], {}
if os.environ.get("BPP_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("bpp-kernels: torch is not importable at build time; skipping the C++ extension")
    else:
        ext_modules = [
            CppExtension(
                "bpp_kernels._C",
                sorted(glob("csrc/**/*.cpp", recursive=True)),
                depends=sorted(glob("csrc/**/*.h", recursive=True)),
                extra_compile_args={"cxx": ["-O3", "-fopenmp", "-march=x86-64-v2"]},
                extra_link_args=["-fopenmp"],
                optional=True,
            )
        ]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
