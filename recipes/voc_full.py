"""Pascal VOC 2012 + SBD, full supervision (the upper bound of the paper's table).

    python -m recipes.voc_full --data.root /data/voc --data.download true

Every argument: ``--help``; the full configuration: ``--print_config``.
"""

from __future__ import annotations

from gcrf.data.voc import VOCDataModule
from recipes.cli import recipe_main
from recipes.presets import VOC_FULL

main = recipe_main(VOCDataModule, VOC_FULL)

if __name__ == "__main__":
    main()
