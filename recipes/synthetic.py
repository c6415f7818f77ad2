"""Procedural scenes (no download), any supervision: ``python -m recipes.synthetic``.

Examples::

    python -m recipes.synthetic                                   # full masks
    python -m recipes.synthetic --model.loss_cross_entropy_modality semseg_scribbles
    python -m recipes.synthetic --model.loss_cross_entropy_modality semseg_scribbles \\
        --model.loss_gatedcrf true                                # scribbles + Gated CRF

Every argument: ``--help``; the full configuration: ``--print_config``.
"""

from __future__ import annotations

from gcrf.data.synthetic import SyntheticDataModule
from recipes.cli import recipe_main
from recipes.presets import SYNTHETIC

main = recipe_main(SyntheticDataModule, SYNTHETIC)

if __name__ == "__main__":
    main()
