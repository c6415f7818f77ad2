"""Class names and display colours of the datasets of gcrf: the one home of every palette.

Colours are the datasets' own where they have them: the VOC colour map of the devkit (``bitget``
construction, the palette of VOC's ``SegmentationClass`` PNGs) and the Cityscapes ``labels.py``
colours of the 19 train ids. ACDC gets four distinct colours, the procedural scenes their classes'
mean colours (:data:`SYNTHETIC_MEAN_COLOURS`, which the generator draws around), and
:func:`distinct_palette` colours any other set of classes (the fallback of the TensorBoard grids).
:data:`IGNORE_COLOR` shows the ignore label in every picture.
"""

from __future__ import annotations

import colorsys

import torch

__all__ = [
    "ACDC_CLASS_NAMES",
    "ACDC_PALETTE",
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_PALETTE",
    "IGNORE_COLOR",
    "SYNTHETIC_MEAN_COLOURS",
    "VOC_CLASS_NAMES",
    "VOC_PALETTE",
    "distinct_palette",
    "synthetic_palette",
    "voc_colormap",
]

#: Colour of the ignore label in pictures: the "void" colour of the Pascal VOC annotations, which no
#: class of any palette here uses.
IGNORE_COLOR: tuple[int, int, int] = (224, 224, 192)

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


#: Background, right ventricle, myocardium, left ventricle (the ACDC label values 0..3).
ACDC_CLASS_NAMES: tuple[str, ...] = ("background", "rv", "myo", "lv")

#: 4×3 uint8 colours of the ACDC classes.
ACDC_PALETTE: torch.Tensor = torch.tensor(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200]], dtype=torch.uint8
)

#: Mean colour (RGB in [0, 1]) of each object class of the procedural scenes, in class order from
#: class 1: the generator draws every object's colour around it (:mod:`gcrf.data.synthetic`).
SYNTHETIC_MEAN_COLOURS: tuple[tuple[float, float, float], ...] = (
    (0.80, 0.35, 0.30),
    (0.30, 0.70, 0.35),
    (0.30, 0.40, 0.80),
    (0.80, 0.75, 0.30),
    (0.70, 0.35, 0.75),
    (0.30, 0.75, 0.75),
)


def synthetic_palette(num_classes: int) -> torch.Tensor:
    """Display colours of the procedural classes: background black, objects their mean colour.

    Args:
        num_classes: number of classes including the background (2 to 7).

    Returns:
        ``num_classes``×3 uint8 tensor.

    Example:
        >>> synthetic_palette(3).tolist()
        [[0, 0, 0], [204, 89, 76], [76, 178, 89]]
    """
    if not isinstance(num_classes, int) or not 2 <= num_classes <= len(SYNTHETIC_MEAN_COLOURS) + 1:
        raise ValueError(
            f"num_classes must be an int in [2, {len(SYNTHETIC_MEAN_COLOURS) + 1}], got "
            f"{num_classes!r}"
        )
    colours = [(0.0, 0.0, 0.0), *SYNTHETIC_MEAN_COLOURS[: num_classes - 1]]
    return torch.tensor(colours, dtype=torch.float64).mul(255).round().to(torch.uint8)


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
