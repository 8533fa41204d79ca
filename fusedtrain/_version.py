"""The version of fusedtrain, in one place: pyproject.toml reads it (setuptools dynamic version,
statically, without importing the package or torch) and fusedtrain.__version__ re-exports it."""
__version__ = "0.1.0"
