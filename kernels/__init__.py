"""Triton kernels of gcrf, installed as ``gcrf.kernels``.

This package sits below ``gcrf``: it imports nothing from it.
"""
