"""The augmentation settings every geometry and the pipeline read (published flags ``aug_*``)."""

from __future__ import annotations

import dataclasses

__all__ = ["AugmentationConfig"]


@dataclasses.dataclass(frozen=True)
class AugmentationConfig:
    """Augmentation settings (published flags ``aug_*``).

    Args:
        crop_size: side of the square training crop (``aug_input_crop_size``).
        scale_min: lower bound of the random scale (``aug_geom_scale_min``).
        scale_max: upper bound of the random scale (``aug_geom_scale_max``).
        tilt_max_deg: largest rotation in degrees, either direction (``aug_geom_tilt_max_deg``).
        wiggle_max_ratio: perspective warp: each crop corner moves by up to this fraction of the
            crop size in x and y (``aug_geom_wiggle_max_ratio``, 0 to 1).
        reflect: random horizontal flips (``aug_geom_reflect``).
        validation_center_crop: centre-crop validation samples (``aug_geom_validation_center_crop_sts``).
        validation_center_crop_size: side of that crop, padded when the image is smaller
            (``aug_geom_validation_center_crop_size``).
        stroke_width: pen diameter in pixels for rasterised scribbles and clicks
            (``aug_semseg_weak_stroke_width``).
        scribble_length_ratio: keep the middle fraction of every scribble's length (1 = whole
            scribble; the published scribble-length ablation).

    Example:
        >>> AugmentationConfig(crop_size=256, tilt_max_deg=10).scale_max
        2.0
    """

    crop_size: int = 512
    scale_min: float = 0.5
    scale_max: float = 2.0
    tilt_max_deg: float = 0.0
    wiggle_max_ratio: float = 0.0
    reflect: bool = True
    validation_center_crop: bool = False
    validation_center_crop_size: int = 512
    stroke_width: int = 1
    scribble_length_ratio: float = 1.0

    def __post_init__(self) -> None:
        for name in ("crop_size", "validation_center_crop_size", "stroke_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(
                f"need 0 < scale_min <= scale_max, got scale_min={self.scale_min!r}, "
                f"scale_max={self.scale_max!r}"
            )
        if not 0 <= self.tilt_max_deg <= 180:
            raise ValueError(f"tilt_max_deg must be in [0, 180], got {self.tilt_max_deg!r}")
        if not 0 <= self.wiggle_max_ratio <= 1:
            raise ValueError(f"wiggle_max_ratio must be in [0, 1], got {self.wiggle_max_ratio!r}")
        if not 0 < self.scribble_length_ratio <= 1:
            raise ValueError(
                f"scribble_length_ratio must be in (0, 1], got {self.scribble_length_ratio!r}"
            )
