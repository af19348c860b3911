"""Build the native core: every smsblock/*.pyx becomes an extension module.

SMSBLOCK_DEBUG=1 turns Cython's bounds, wraparound and initialisation checks on (the test
build); the default is the fast release build.  The native modules link Debian's
libdeflate, libxxhash and libzstd (packages libdeflate-dev, libxxhash-dev, libzstd-dev).
"""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("SMSBLOCK_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
    # the debug build turns bounds checks on on purpose: its "use boundscheck(False)" hints are noise
    "show_performance_hints": not DEBUG,
}

extensions = [
    Extension(
        name="smsblock." + os.path.splitext(os.path.basename(pyx))[0],
        sources=[pyx],
        include_dirs=["csrc"],
        libraries=["deflate", "xxhash", "zstd"],
        extra_compile_args=["-O3", "-Wno-unused-function"] + (["-UNDEBUG", "-g"] if DEBUG else []),
        define_macros=[("SMSBLOCK_DEBUG", "1" if DEBUG else "0")],
    )
    for pyx in sorted(glob.glob("smsblock/*.pyx"))
    # SMSBLOCK_ONLY=_vmdk,_scan builds just those (handy while others import the rest)
    if not os.environ.get("SMSBLOCK_ONLY")
    or os.path.splitext(os.path.basename(pyx))[0] in os.environ["SMSBLOCK_ONLY"].split(",")
]

setup(
    # pip's (editable) build compiles the modules side by side, as `build_ext -j` does
    options={"build_ext": {"parallel": max(2, os.cpu_count() or 1)}},
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        build_dir="build/cython-debug" if DEBUG else "build/cython",
        quiet=True,
    ),
)
