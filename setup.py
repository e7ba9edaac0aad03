"""Builds the optional C accelerator of capture's hot path (capture/_ringc.c). Everything else is
in pyproject.toml. Where no C compiler or Python headers are found the build goes on without it
(optional=True) and capture writes its frames in Python (same frames, slower)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("epreplay.capture._ringc", ["capture/_ringc.c"], optional=True,
                             extra_compile_args=["-O2"])])
