"""gcrf: the Gated CRF loss for weakly supervised semantic segmentation.

Layers, top to bottom: ``recipes/`` (experiments) → ``gcrf`` (loss, models, data, viz, training)
→ ``gcrf.kernels`` (Triton kernels). See ``README.md``.
"""

__version__ = "0.1.0"
