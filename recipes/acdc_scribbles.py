"""ACDC cardiac MRI, scribbles: partial cross entropy + the Gated CRF loss (WSL4MIS's setting).

    python -m recipes.acdc_scribbles --data.root /data/ACDC --data.fold 1
    python -m recipes.acdc_scribbles --data.root /data/ACDC --model.loss_gatedcrf false  # pCE alone

The Gated CRF loss reads the full-resolution UNet probabilities with the kernel
``{"weight": 1, "xy": 6, "rgb": 0.1}`` on the [0, 1] MR intensities, radius 5, weight 0.1.
Validation and checkpoints as in ``recipes.acdc_full``.

Every argument: ``--help``; the full configuration: ``--print_config``.
"""

from __future__ import annotations

from gcrf.data.acdc import ACDCDataModule
from recipes.cli import recipe_main
from recipes.presets import ACDC_SCRIBBLES

main = recipe_main(ACDCDataModule, ACDC_SCRIBBLES, monitor="val/dice")

if __name__ == "__main__":
    main()
