"""Experiments on top of the ``fusion`` package: the mode comparison and local run helpers."""
