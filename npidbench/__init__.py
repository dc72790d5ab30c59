"""npidbench: evaluate any self-supervised ResNet checkpoint on the standard transfer benchmarks."""

__version__ = "0.1.0"
