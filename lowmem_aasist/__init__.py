"""lowmem-aasist: train AASIST anti-spoofing models within a memory budget."""

__version__ = "0.1.0"
