"""Pascal VOC 2012 + SBD, clicks ("What's the point" + background clicks) + Gated CRF loss.

    python -m recipes.voc_clicks --data.root /data/voc --data.download true

The click files ship with gcrf (``datasets/voc_clicks/``); no scribble download is needed.

Every argument: ``--help``; the full configuration: ``--print_config``.
"""

from __future__ import annotations

from gcrf.data.voc import VOCDataModule
from recipes.cli import recipe_main
from recipes.presets import VOC_CLICKS

main = recipe_main(VOCDataModule, VOC_CLICKS)

if __name__ == "__main__":
    main()
