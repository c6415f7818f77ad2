"""Class names and display colours of the datasets of gcrf (Pascal VOC, Cityscapes).

Colours are the datasets' own: the VOC colour map of the devkit (``bitget`` construction, the palette
of VOC's ``SegmentationClass`` PNGs) and the Cityscapes ``labels.py`` colours of the 19 train ids.
:func:`distinct_palette` colours any other set of classes (the fallback of the TensorBoard grids).
"""

from __future__ import annotations

import colorsys

import torch

__all__ = [
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_PALETTE",
    "VOC_CLASS_NAMES",
    "VOC_PALETTE",
    "distinct_palette",
    "voc_colormap",
]

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_colormap(num_colours: int = 256) -> torch.Tensor:
    """The VOC devkit colour map: colour ``i`` spreads the bits of ``i`` over R, G, B (MSB first).

    Args:
        num_colours: how many entries (256 gives the full palette of the VOC label PNGs).

    Returns:
        ``num_colours``×3 uint8 tensor.

    Example:
        >>> voc_colormap(3).tolist()
        [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    """
    if not isinstance(num_colours, int) or not 1 <= num_colours <= 256:
        raise ValueError(f"num_colours must be an int in [1, 256], got {num_colours!r}")
    colours = []
    for index in range(num_colours):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.append((r, g, b))
    return torch.tensor(colours, dtype=torch.uint8)


#: 21×3 uint8 colours of the VOC classes.
VOC_PALETTE: torch.Tensor = voc_colormap(len(VOC_CLASS_NAMES))

#: Cityscapes classes in train-id order (0..18).
CITYSCAPES_CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

#: 19×3 uint8 colours of the Cityscapes train ids.
CITYSCAPES_PALETTE: torch.Tensor = torch.tensor(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    dtype=torch.uint8,
)


def distinct_palette(num_classes: int) -> torch.Tensor:
    """Display colours for classes without a palette of their own: class 0 black, the others by
    golden-ratio steps of hue (neighbouring class ids get far-apart colours).

    Args:
        num_classes: number of colours.

    Returns:
        ``num_classes``×3 uint8 tensor.

    Example:
        >>> distinct_palette(3)[0].tolist()
        [0, 0, 0]
    """
    colours = [(0, 0, 0)] + [
        tuple(round(255 * v) for v in colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.75, 0.95))
        for c in range(1, num_classes)
    ]
    return torch.tensor(colours, dtype=torch.uint8)
