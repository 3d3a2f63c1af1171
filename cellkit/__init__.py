"""cellkit: helpers for the deep-learning-for-cell-images notebooks, a command line and an app."""

__version__ = "0.1.0"
