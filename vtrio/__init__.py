"""vtrio: Virtool's backend core, re-created with Trio's structured concurrency."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vtrio")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
