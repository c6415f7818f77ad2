"""Cityscapes (fine), synthetic clicks + Gated CRF loss.

    python -m gcrf.data.cityscapes_clicks --root /data/cityscapes   # once: writes the clicks
    python -m recipes.cityscapes_clicks --data.root /data/cityscapes

Every argument: ``--help``; the full configuration: ``--print_config``.
"""

from __future__ import annotations

from gcrf.data.cityscapes import CityscapesDataModule
from recipes.cli import recipe_main
from recipes.presets import CITYSCAPES_CLICKS

main = recipe_main(CityscapesDataModule, CITYSCAPES_CLICKS)

if __name__ == "__main__":
    main()
