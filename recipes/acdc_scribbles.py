"""ACDC cardiac MRI, scribbles: partial cross entropy + the Gated CRF loss (WSL4MIS's setting).

    python -m recipes.acdc_scribbles --data.root /data/ACDC --data.fold 1
    python -m recipes.acdc_scribbles --data.root /data/ACDC --model.loss_gatedcrf false  # pCE alone

The Gated CRF loss reads the full-resolution UNet probabilities with WSL4MIS's kernel on the
[0, 1] MR intensities, which ACDC names ``intensity`` (``{"weight": 1, "xy": 6, "intensity": 0.1}``:
a kernel given with ``--model.loss_gatedcrf_kernels_desc`` names its appearance term so too),
radius 5, weight 0.1.
Validation and checkpoints as in ``recipes.acdc_full``.

Every argument: ``--help``; the full configuration: ``--print_config``.
"""

from __future__ import annotations

from gcrf.data.acdc import ACDCDataModule
from recipes.cli import recipe_main
from recipes.presets import ACDC_SCRIBBLES

main = recipe_main(ACDCDataModule, ACDC_SCRIBBLES)

if __name__ == "__main__":
    main()
