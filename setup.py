"""Build of the one compiled module: stream._fastreq, the canonical request decoder.

Everything else is declared in pyproject.toml. The extension is optional: where it cannot be
compiled, the install still succeeds and stream.events decodes with its Python path (same rows).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("stream._fastreq", sources=["stream/_fastreq.c"],
                             extra_compile_args=["-O2", "-std=c99"], optional=True)])
