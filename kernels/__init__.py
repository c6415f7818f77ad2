"""Triton kernels of gcrf, installed as ``gcrf.kernels``.

This package sits below ``gcrf``: it imports nothing from it.

- :mod:`gcrf.kernels.gated_crf`: the fused Gated CRF pairwise sum (forward and backward) and the
  window affinity, registered as ``torch.ops.gcrf.*`` custom ops (the ``"triton"`` backend of
  ``gcrf.loss``).
"""
