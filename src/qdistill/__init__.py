"""qdistill: distil full-precision teachers into DoReFa low-bit students."""
__version__ = "0.1.0"
