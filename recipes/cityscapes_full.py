"""Cityscapes (fine), full supervision.

    python -m recipes.cityscapes_full --data.root /data/cityscapes

Every argument: ``--help``; the full configuration: ``--print_config``.
"""

from __future__ import annotations

from gcrf.data.cityscapes import CityscapesDataModule
from recipes.cli import recipe_main
from recipes.presets import CITYSCAPES_FULL

main = recipe_main(CityscapesDataModule, CITYSCAPES_FULL)

if __name__ == "__main__":
    main()
