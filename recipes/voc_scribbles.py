"""Pascal VOC 2012 + SBD, ScribbleSup scribbles + Gated CRF loss (the paper's main setting).

    python -m recipes.voc_scribbles --data.root /data/voc --data.download true

The scribbles are downloaded to the data root on first use and checked against
``datasets/scribblesup.json``.

Every argument: ``--help``; the full configuration: ``--print_config``.
"""

from __future__ import annotations

from gcrf.data.voc import VOCDataModule
from recipes.cli import recipe_main
from recipes.presets import VOC_SCRIBBLES

main = recipe_main(VOCDataModule, VOC_SCRIBBLES)

if __name__ == "__main__":
    main()
