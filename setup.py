"""Only here because setuptools takes `cffi_modules` from setup(), not from pyproject.toml.

Building the package (pip install .) compiles the C kernel library through cffi.
"""
from setuptools import setup

setup(cffi_modules=["kernels/build_ffi.py:ffibuilder"])
