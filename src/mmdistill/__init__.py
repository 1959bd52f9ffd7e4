"""mmdistill: make big multimodal models small and fast, and prove how much they keep."""

__version__ = "0.1.0"
