"""CogVideoX text-to-video, written from the paper (arXiv 2408.06072)."""

__version__ = "0.1.0"
