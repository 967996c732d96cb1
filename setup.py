"""Build script: the pure-Python package, plus the native CPU extension when possible."""

from setuptools import setup

setup()
