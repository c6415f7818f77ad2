"""ACDC cardiac MRI, full supervision (0.5 · CE + 0.5 · Dice on the dense labels, as WSL4MIS).

    python -m recipes.acdc_full --data.root /data/ACDC --data.fold 1
    python -m recipes.acdc_full --data.root /data/ACDC --data.download true

Validation scores the fold's volumes in 3D (``val/dice``, ``val/dice_rv``, ``val/dice_myo``,
``val/dice_lv``, ``val/hd95``); the best checkpoint is the one with the highest mean Dice (what ``ACDCDataModule`` declares it
monitors).

Every argument: ``--help``; the full configuration: ``--print_config``.
"""

from __future__ import annotations

from gcrf.data.acdc import ACDCDataModule
from recipes.cli import recipe_main
from recipes.presets import ACDC_FULL

main = recipe_main(ACDCDataModule, ACDC_FULL)

if __name__ == "__main__":
    main()
