"""layerstream: stream GGUF transformer layers from disk and host RAM through a small GPU."""

__version__ = "0.1.0"
