"""Models: a shared evaluation base and one sub-package per method."""
