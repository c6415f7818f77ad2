"""Synthetic clicks for Cityscapes, generated from the fine instance masks.

Run once after placing Cityscapes (see :mod:`gcrf.data.cityscapes`)::

    python -m gcrf.data.cityscapes_clicks --root data/cityscapes            # train and val
    python -m gcrf.data.cityscapes_clicks --root data/cityscapes --splits [val] --placement random --seed 3
    python -m gcrf.data.cityscapes_clicks --help     # every argument (jsonargparse, like every command)

**The rule** (applied to every ``*_gtFine_instanceIds.png``; a value ``v >= 1000`` is object
``v % 1000`` of label id ``v // 1000``, a value ``v < 1000`` is the label id ``v`` of a region
without instance id):

- one click per object of a "thing" class (``v >= 1000``; train id of ``v // 1000``), whatever its
  size and however many pieces occlusion cut it into;
- one click per connected component of every region ``v < 1000`` of a train class: the "stuff"
  classes (road ... sky) and the crowds ("group" polygons) of thing classes. Components use
  **8-connectivity** by default (``--connectivity 4`` to change), so a thin diagonal pole stays one
  component. Components smaller than ``--min_area`` pixels (default 64, an 8×8 patch, 0.003 % of a
  1024×2048 frame) get no click: they are crumbs left by occlusion and polygon rasterisation (a few
  pixels of road between the wheels of a car) that a person clicking objects would not click.
  ``--min_area 0`` keeps every component;
- label ids without a train id (ignore regions, caravan, trailer, ...) get no click.

**Placement**: ``center`` (default) puts the click on the pixel of the region farthest from its
boundary (Euclidean distance transform; pixels outside the image count as boundary; ties go to the
first pixel in row-major order: smallest row, then smallest column); ``random`` puts it on a pixel
drawn uniformly from the region with a generator seeded by ``sha256(f"{seed}/{image_name}")``, so
every image's clicks depend only on its name and the seed — not on the order, the split or the
number of workers. Coordinates are pixel centres (``x`` = column, ``y`` = row, integers as floats).

**Output**: JSON in the format of the VOC click files, ``{image_name: [{"x", "y", "cls"}, ...]}``
(``image_name`` = ``<city>_<seq>_<frame>``, ``cls`` = train id, images sorted by name, every image of
the split present, possibly with an empty list), gzip-compressed when the name ends in ``.gz``, and
a sidecar ``<file>.meta.json`` with the generator version, the rule, its parameters and the sha256
of the (uncompressed) JSON bytes, which :class:`gcrf.data.cityscapes.CityscapesDataModule` checks.
``--output`` is a path template: ``{split}`` in it gives one file per split (default
``<root>/gcrf_clicks_{split}.json``, what the data module reads); without it, one file holds the
clicks of all requested splits. Two runs with the same arguments write identical bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from gcrf.data.cityscapes import (
    LABEL_ID_TO_TRAIN_ID,
    SPLITS,
    CityscapesRecord,
    click_sidecar_path,
    default_clicks_file,
    list_split,
    read_id_png,
)
from gcrf.data.weak_labels import sha256_of_bytes

__all__ = [
    "CONNECTIVITIES",
    "DEFAULT_MIN_AREA",
    "GENERATOR_VERSION",
    "PLACEMENTS",
    "RULE",
    "clicks_from_instance_ids",
    "generate_clicks",
    "image_seed",
    "main",
]

log = logging.getLogger(__name__)

#: Bumped whenever the same arguments would give different clicks.
GENERATOR_VERSION = 1

#: Click placements.
PLACEMENTS: tuple[str, ...] = ("center", "random")

#: Pixel connectivities of the stuff components.
CONNECTIVITIES: tuple[int, ...] = (4, 8)

#: Stuff components smaller than this (pixels) get no click by default.
DEFAULT_MIN_AREA = 64

#: The rule, as recorded in the sidecar.
RULE = (
    "one click per thing instance (instanceIds >= 1000, train id of id // 1000) and one per "
    "connected component of each region with instanceIds < 1000 of a train class (stuff classes "
    "and thing crowds) of at least min_area pixels; center: the pixel farthest from the region "
    "boundary (Euclidean distance transform, image border = boundary, ties: first in row-major "
    "order); random: a uniform pixel of the region, generator seeded by sha256(f'{seed}/{name}')"
)


def image_seed(image_name: str, seed: int) -> int:
    """The seed of one image's random placement: a stable hash of ``seed`` and the image name.

    Example:
        >>> image_seed("aachen_000000_000019", 0) == image_seed("aachen_000000_000019", 0)
        True
    """
    digest = hashlib.sha256(f"{seed}/{image_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _check_rule(placement: str, connectivity: int, min_area: int) -> None:
    """Validate the parameters of the click rule (``ValueError`` naming the argument)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity!r}")
    if not isinstance(min_area, int) or isinstance(min_area, bool) or min_area < 0:
        raise ValueError(f"min_area must be an int >= 0, got {min_area!r}")


def _place(region: np.ndarray, placement: str, rng: np.random.Generator | None) -> tuple[int, int]:
    """(row, col) of the click inside a boolean region (in the region's own array)."""
    if placement == "center":
        # Padding with False makes the image border a boundary (a region touching the border is
        # clicked away from it, as an annotator would).
        distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        # argmax returns the first maximum in row-major order: a deterministic tie-break.
        flat = int(np.argmax(distance))
    else:
        pixels = np.flatnonzero(region)
        flat = int(pixels[rng.integers(len(pixels))])
    row, col = divmod(flat, region.shape[1])
    return row, col


def clicks_from_instance_ids(
    instance_ids: np.ndarray,
    placement: str = "center",
    rng: np.random.Generator | None = None,
    connectivity: int = 8,
    min_area: int = DEFAULT_MIN_AREA,
) -> list[dict[str, Any]]:
    """The clicks of one image from its Cityscapes instance-id map (the rule of the module docstring).

    Args:
        instance_ids: H×W integer map of a ``*_gtFine_instanceIds.png``.
        placement: ``"center"`` or ``"random"``.
        rng: the generator of ``"random"`` placement (see :func:`image_seed`); unused for center.
        connectivity: 4 or 8, the pixel connectivity of stuff components.
        min_area: stuff components with fewer pixels get no click (0 keeps all).

    Returns:
        ``[{"x": float, "y": float, "cls": int}, ...]``: regions in increasing instance-id value
        (stuff and crowds first, by label id; components in scan order), then objects by id.

    Example:
        >>> ids = np.full((5, 7), 7, dtype=np.int32); ids[1:4, 3:6] = 26001
        >>> clicks_from_instance_ids(ids, min_area=0)
        [{'x': 1.0, 'y': 1.0, 'cls': 0}, {'x': 4.0, 'y': 2.0, 'cls': 13}]
    """
    ids = np.asarray(instance_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"instance_ids must be an H×W integer array, got shape {ids.shape}, dtype {ids.dtype}"
        )
    _check_rule(placement, connectivity, min_area)
    if placement == "random" and rng is None:
        raise ValueError("placement='random' needs rng (a numpy Generator), got None")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    values, inverse = np.unique(ids, return_inverse=True)
    # One pass over the image gives the bounding box of every value; each region is then worked on
    # inside its box (exact: the 1-pixel frame around the box lies outside the region).
    boxes = ndimage.find_objects(inverse.reshape(ids.shape) + 1)
    clicks: list[dict[str, Any]] = []
    for value, box in zip(values.tolist(), boxes, strict=True):
        train_id = LABEL_ID_TO_TRAIN_ID.get(value // 1000 if value >= 1000 else value)
        if train_id is None or box is None:
            continue
        mask = ids[box] == value
        top, left = box[0].start, box[1].start
        if value >= 1000:
            regions = [(mask, top, left)]
        else:
            components, count = ndimage.label(mask, structure)
            regions = []
            for k, sub in enumerate(ndimage.find_objects(components, count), start=1):
                region = components[sub] == k
                if int(region.sum()) >= min_area:
                    regions.append((region, top + sub[0].start, left + sub[1].start))
        for region, row0, col0 in regions:
            row, col = _place(region, placement, rng)
            clicks.append({"x": float(col0 + col), "y": float(row0 + row), "cls": int(train_id)})
    return clicks


def _image_clicks(job: tuple[CityscapesRecord, str, int, int, int]) -> tuple[str, list[dict]]:
    """Worker: the clicks of one image (a top-level function, so that a Pool can pickle it)."""
    record, placement, seed, connectivity, min_area = job
    rng = np.random.default_rng(image_seed(record.name, seed)) if placement == "random" else None
    clicks = clicks_from_instance_ids(
        read_id_png(record.instance_ids), placement, rng, connectivity, min_area
    )
    return record.name, clicks


def _encode(content: dict[str, list[dict]]) -> bytes:
    """Deterministic JSON bytes (images sorted by name, fixed separators)."""
    ordered = {name: content[name] for name in sorted(content)}
    return json.dumps(ordered, separators=(",", ":")).encode()


def generate_clicks(
    root: str,
    output: str | None = None,
    splits: list[Literal["train", "val"]] | tuple[str, ...] = SPLITS,
    seed: int = 0,
    placement: Literal["center", "random"] = "center",
    connectivity: Literal[4, 8] = 8,
    min_area: int = DEFAULT_MIN_AREA,
    workers: int | None = None,
) -> list[Path]:
    """Generate the click files of Cityscapes splits and their ``.meta.json`` sidecars.

    The command line ``python -m gcrf.data.cityscapes_clicks`` is this function's signature
    (jsonargparse): ``--root``, ``--output``, ``--splits [train, val]``, ``--seed``,
    ``--placement``, ``--connectivity``, ``--min_area``, ``--workers``.

    Args:
        root: the Cityscapes root.
        output: path template; ``{split}`` in it gives one file per split, otherwise one file for
            all ``splits``; a name ending in ``.gz`` is gzip-compressed. ``None``:
            ``root/gcrf_clicks_{split}.json`` (what the data module reads by default).
        splits: ``"train"`` and/or ``"val"``.
        seed: seed of random placement (recorded in the sidecar either way).
        placement: ``"center"`` or ``"random"``.
        connectivity: 4 or 8 (stuff components).
        min_area: smallest stuff component that gets a click, in pixels (0 keeps all).
        workers: processes over images; 0 or 1 work in this process; ``None``: up to 8, one per CPU.

    Returns:
        The click files written.

    Raises:
        FileNotFoundError: Cityscapes missing or incomplete under ``root`` (the message says where
            to get it and the layout).
        ValueError: bad arguments.

    Example:
        >>> # generate_clicks("data/cityscapes", splits=["val"], workers=4)
    """
    splits = list(dict.fromkeys(splits))
    if not splits or any(split not in SPLITS for split in splits):
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits!r}")
    _check_rule(placement, connectivity, min_area)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"workers must be an int >= 0 or None, got {workers!r}")
    template = output if output is not None else default_clicks_file(root)
    # Check every split's layout before the (long) generation starts.
    records = {split: list_split(root, split, require_instances=True) for split in splits}
    groups: dict[Path, list[str]] = {}
    for split in splits:
        groups.setdefault(Path(template.replace("{split}", split)), []).append(split)

    written = []
    for path, group in groups.items():
        jobs = [
            (record, placement, seed, connectivity, min_area)
            for split in group
            for record in records[split]
        ]
        log.info("Cityscapes clicks: %d images of %s → %s", len(jobs), "+".join(group), path)
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context().Pool(workers) as pool:
                results = pool.map(
                    _image_clicks, jobs, chunksize=max(1, len(jobs) // (4 * workers))
                )
        else:
            results = [_image_clicks(job) for job in jobs]
        content = dict(results)
        data = _encode(content)
        metadata = {
            "generator": __name__,
            "version": GENERATOR_VERSION,
            "rule": RULE,
            "placement": placement,
            "seed": seed,
            "connectivity": connectivity,
            "min_area": min_area,
            "splits": group,
            "images": len(content),
            "clicks": sum(len(clicks) for clicks in content.values()),
            "sha256": sha256_of_bytes(data),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        # mtime=0: the gzip header carries no timestamp, so two runs write identical bytes.
        path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
        click_sidecar_path(path).write_text(json.dumps(metadata, indent=2) + "\n")
        log.info("wrote %d clicks for %d images to %s", metadata["clicks"], len(content), path)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m gcrf.data.cityscapes_clicks --help``.

    Args:
        argv: the arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The exit status (0).

    Example:
        >>> # main(["--root", "data/cityscapes", "--splits", "[val]"])
    """
    from jsonargparse import CLI

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    CLI(generate_clicks, args=list(argv) if argv is not None else None, as_positional=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
