"""migtap: a live-migration proxy and tap for QEMU."""

__version__ = "0.1.0"
