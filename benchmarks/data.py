"""Benchmark of the training data pipeline: decoding + the training transform, per sample, one thread.

Run from the repository root::

    python -m benchmarks.data                        # VOC-size and Cityscapes-size cases
    python -m benchmarks.data --samples 40 --cases [cityscapes]
    python -m benchmarks.data --steps_per_second [2,8] --json_path data.json

For each case, files in the real formats are written to a temporary folder once (a JPEG image and
a palette PNG label for VOC-size frames; a PNG image and a PNG label for Cityscapes-size frames,
with scribbles and clicks as polylines and points), then three pipelines read and transform them
on one thread, interleaved sample by sample so that machine load hits all three alike:

- **floor**: decode the image and the label, build one sampling grid for the crop and resample the
  image once (bilinear) and the label once (nearest) straight into it — the least any pipeline
  with this geometry can do;
- **gcrf**: decode, then ``gcrf.data.transforms.build_transform(config, train=True)`` — the whole
  training transform (geometry, validity, weak-label rasterisation, normalisation);
- **previous**: decode, then the implementation this replaced: the source converted to float at
  full size, padded to a canvas at least as large as the source, warped there with torchvision's
  ``perspective`` (image, label and validity mask), then cropped; weak labels as in gcrf.

The geometry is the published training geometry (scale 0.5–2, tilt 10°, wiggle 0.1, flip) with
each case's crop. Printed per case: median milliseconds per sample, samples/s per loader worker,
the ratio of gcrf to the floor and the speed-up of the transform over the previous one.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import CLI
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from benchmarks.tables import ResultTable
from gcrf.conventions import IGNORE_INDEX
from gcrf.data.transforms import (
    AugmentationConfig,
    RandomGeometry,
    Resampler,
    SampleTransform,
    build_transform,
    to_tv_tensors,
    warp_params,
)

__all__ = ["CASES", "Case", "loader_processes", "main", "measure"]


@dataclass(frozen=True)
class Case:
    """One frame size and its training crop."""

    name: str
    height: int
    width: int
    crop: int
    image_format: str  # "JPEG" or "PNG"
    classes: int
    recipes: str  # the recipes whose defaults this case stands for
    batch_size: int  # their published batch size


CASES: dict[str, Case] = {
    "voc": Case("VOC 500×375 JPEG → 256", 375, 500, 256, "JPEG", 21, "voc_*", 48),
    "cityscapes": Case(
        "Cityscapes 2048×1024 PNG → 512", 1024, 2048, 512, "PNG", 19, "cityscapes_*", 16
    ),
}


def _config(crop: int) -> AugmentationConfig:
    return AugmentationConfig(
        crop_size=crop, scale_min=0.5, scale_max=2.0, tilt_max_deg=10, wiggle_max_ratio=0.1
    )


def _write_files(case: Case, count: int, folder: Path, seed: int) -> list[dict[str, Any]]:
    """``count`` frames: a photo-like image (smooth shapes, texture, sensor noise), a label map of
    the same regions, scribbles and clicks; the files in the real formats, the rest in memory."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : case.height, 0 : case.width].astype(np.float32)
    records = []
    for k in range(count):
        label = np.zeros((case.height, case.width), np.uint8)
        image = np.empty((case.height, case.width, 3), np.float32)
        image[:] = rng.uniform(40, 200, 3)
        for _ in range(12):  # ellipses of random classes and colours
            cy, cx = rng.uniform(0, case.height), rng.uniform(0, case.width)
            ry, rx = rng.uniform(0.05, 0.3) * case.height, rng.uniform(0.05, 0.3) * case.width
            inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1
            label[inside] = rng.integers(1, case.classes)
            image[inside] = rng.uniform(0, 255, 3)
        image += 20 * np.sin(cols / 17 + k)[..., None] + rng.normal(0, 4, image.shape)
        label[rng.random(label.shape) < 0.01] = IGNORE_INDEX
        image_path = folder / f"frame{k}.{'jpg' if case.image_format == 'JPEG' else 'png'}"
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(
            image_path,
            case.image_format,
            **({"quality": 90} if case.image_format == "JPEG" else {}),
        )
        label_path = folder / f"frame{k}_label.png"
        label_image = Image.fromarray(label, mode="L")
        if case.image_format == "JPEG":  # VOC labels are palette PNGs
            label_image = label_image.convert("P")
        label_image.save(label_path)
        size = np.array([case.width - 1, case.height - 1], np.float32)
        scribbles = [
            (
                int(rng.integers(0, case.classes)),
                rng.uniform(0, 1, (20, 2)).astype(np.float32) * size,
            )
            for _ in range(4)
        ]
        clicks = [
            (int(rng.integers(0, case.classes)), rng.uniform(0, 1, 2).astype(np.float32) * size)
            for _ in range(6)
        ]
        records.append(
            {"image": image_path, "label": label_path, "scribbles": scribbles, "clicks": clicks}
        )
    return records


def _decode(record: dict[str, Any]) -> dict[str, Any]:
    """Read the files the way the datasets do (PIL, RGB image, label as an array)."""
    with Image.open(record["image"]) as image:
        rgb = image.convert("RGB")
    with Image.open(record["label"]) as label:
        dense = np.asarray(label)
    return {
        "image": rgb,
        "semseg_dense": dense,
        "scribbles": record["scribbles"],
        "clicks": record["clicks"],
        "index": 0,
    }


def _floor(sample: dict[str, Any], geometry: RandomGeometry, crop: int) -> None:
    """One bilinear warp of the image and one nearest warp of the label, straight into the crop."""
    image = torch.from_numpy(np.asarray(sample["image"])).permute(2, 0, 1)
    label = torch.from_numpy(sample["semseg_dense"]).unsqueeze(0)
    height, width = label.shape[-2:]
    resampler = Resampler(geometry.forward_homography(height, width), (height, width), (crop, crop))
    resampler.bilinear(image)
    resampler.nearest(label, IGNORE_INDEX)


class _Previous(SampleTransform):
    """The implementation this benchmark compares against: full-size float conversion, padding to
    a canvas at least as large as the source, torchvision's ``perspective`` on that canvas for the
    image, the label and the validity mask, then the crop (weak labels as in gcrf)."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        data = to_tv_tensors(sample, self.config.scribble_length_ratio)
        image = tv_tensors.Image(data["image"].as_subclass(torch.Tensor).float().div(255))
        height, width = image.shape[-2:]
        crop = self.config.crop_size
        forward = self.geometry.forward_homography(height, width)
        inverse = np.linalg.inv(forward)
        coefficients = (inverse / inverse[2, 2]).reshape(-1)[:8].tolist()
        canvas = (max(height, crop), max(width, crop))
        padding = [0, 0, canvas[1] - width, canvas[0] - height]
        spatial = {}
        for key, raster, fill in (
            ("image", image, 0.0),
            ("semseg_dense", tv_tensors.Mask(data["semseg_dense"].clone()), float(IGNORE_INDEX)),
            ("invalid", tv_tensors.Mask(torch.zeros(1, height, width, dtype=torch.uint8)), 255.0),
        ):
            raster = TF.pad(raster, padding, fill=fill) if any(padding) else raster
            interpolation = (
                TF.InterpolationMode.BILINEAR if key == "image" else TF.InterpolationMode.NEAREST
            )
            raster = TF.perspective(raster, None, None, interpolation, fill, coefficients)
            spatial[key] = TF.crop(raster, 0, 0, crop, crop)
        point_coefficients = warp_params(forward, (height, width), (crop, crop))[
            "coefficients_points"
        ]
        for key in ("scribble_points", "click_points"):
            moved = TF.perspective(data[key], None, None, coefficients=point_coefficients)
            spatial[key] = TF.crop(moved, 0, 0, crop, crop)
        return self.finish(spatial, data["scribble_layout"], data["click_classes"], data["index"])


@dataclass
class Result:
    """Median milliseconds per sample of each pipeline for one case."""

    case: Case
    decode: float
    floor: float
    gcrf: float
    previous: float


def measure(case: Case, samples: int, files: int, seed: int = 0) -> Result:
    """Time decoding, the floor, gcrf and the previous pipeline on ``samples`` draws of one case."""
    config = _config(case.crop)
    gcrf = build_transform(config, train=True)
    previous = _Previous(config, train=True)
    floor_geometry = RandomGeometry(config)
    times: dict[str, list[float]] = {"decode": [], "floor": [], "gcrf": [], "previous": []}
    with tempfile.TemporaryDirectory() as folder:
        records = _write_files(case, files, Path(folder), seed)
        torch.manual_seed(seed)
        for k in range(samples + 1):  # the first round warms up and is not counted
            record = records[k % files]
            rounds = {
                "decode": lambda r=record: _decode(r),
                "floor": lambda r=record: _floor(_decode(r), floor_geometry, case.crop),
                "gcrf": lambda r=record: gcrf(_decode(r)),
                "previous": lambda r=record: previous(_decode(r)),
            }
            for name, run in rounds.items():
                start = time.perf_counter()
                run()
                if k:
                    times[name].append(1e3 * (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return Result(case, **medians)


def loader_processes(batch_size: int, steps_per_second: float, ms_per_sample: float) -> int:
    """Loader processes that keep one GPU fed: batch × steps/s ÷ samples/s per worker, rounded up."""
    return math.ceil(batch_size * steps_per_second * ms_per_sample / 1e3)


def main(
    cases: list[str] | None = None,
    samples: int = 30,
    files: int = 6,
    seed: int = 0,
    steps_per_second: list[float] | None = None,
    json_path: str | None = None,
) -> list[Result]:
    """Measure and print the tables.

    Args:
        cases: names of :data:`CASES` (default: all).
        samples: timed samples per case and pipeline (median reported).
        files: distinct frames written per case (cycled).
        seed: seed of the frames and of the augmentation draws.
        steps_per_second: GPU training-step rates at which to estimate the loader processes that
            keep one GPU fed at the recipe's batch size (assumed rates, not measured here;
            ``python -m benchmarks.device`` puts measured ones against these samples/s).
        json_path: also write the medians per case (ms per sample, samples/s per worker) there.
    """
    rates = steps_per_second or [1.0, 2.0, 4.0]
    torch.set_num_threads(1)
    names = cases or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"cases must be among {sorted(CASES)}, got {unknown}")
    results = [measure(CASES[name], samples, files, seed) for name in names]
    table = ResultTable(
        "Training data pipeline per sample, one thread (median; decode included)",
        ["case", "decode", "floor", "gcrf", "gcrf / floor", "gcrf samples/s", "previous",
         "transform speed-up"],
        notes=["scale 0.5–2, tilt 10°, wiggle 0.1, flip; weak labels: 4 scribbles, 6 clicks"],
    )  # fmt: skip
    for r in results:
        speedup = (r.previous - r.decode) / max(r.gcrf - r.decode, 1e-9)
        table.add_row(
            r.case.name,
            f"{r.decode:.1f} ms",
            f"{r.floor:.1f} ms",
            f"{r.gcrf:.1f} ms",
            f"{r.gcrf / r.floor:.2f}×",
            f"{1e3 / r.gcrf:.0f}",
            f"{r.previous:.1f} ms",
            f"{speedup:.1f}×",
        )
    table.print()
    workers = ResultTable(
        "Loader processes per GPU to keep up (estimate: published batch × assumed GPU "
        "steps/s ÷ measured samples/s per worker, rounded up)",
        ["recipes", "batch"]
        + [f"{rate:g} steps/s: {name}" for rate in rates for name in ("gcrf", "previous")],
    )
    for r in results:
        workers.add_row(
            r.case.recipes,
            r.case.batch_size,
            *[loader_processes(r.case.batch_size, rate, ms) for rate in rates
              for ms in (r.gcrf, r.previous)],
        )  # fmt: skip
    workers.print()
    if json_path:
        records = [{"case": name, "batch_size": r.case.batch_size, "decode_ms": r.decode,
                    "floor_ms": r.floor, "gcrf_ms": r.gcrf, "previous_ms": r.previous,
                    "gcrf_samples_per_s": 1e3 / r.gcrf}
                   for name, r in zip(names, results, strict=True)]  # fmt: skip
        Path(json_path).write_text(json.dumps(records, indent=1))
    return results


if __name__ == "__main__":
    CLI(main)
