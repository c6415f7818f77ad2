"""Downloads with a hash check, and sha256 of files: the one home for both (ACDC, ScribbleSup).

The transfer is ``torch.hub.download_url_to_file`` with the expected sha256 as its ``hash_prefix``:
torch.hub writes to a temporary file beside the target and moves it into place only once the hash
matched, so a failed or corrupted download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

__all__ = ["download_verified", "file_sha256"]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_verified(
    url: str, target: str | Path, sha256: str | None, what: str = "file", where: str = ""
) -> Path:
    """Download ``url`` to ``target``, checked against ``sha256`` (None: no check is possible).

    Args:
        url: the file's address (``file://`` works too, which the tests use).
        target: where the file goes; its folder is created.
        sha256: the expected hex sha256, or None when no known-good digest exists.
        what: what the file is, for messages (e.g. ``"ACDC file patient001_frame01.h5"``).
        where: a sentence for the offline message saying how else to get the file.

    Returns:
        ``target`` as a Path.

    Raises:
        FileNotFoundError: the download failed (offline, or no such file); the message names the
            URL, the target and ``where``.
        ValueError: the downloaded bytes do not have ``sha256`` (nothing is left at ``target``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=sha256, progress=False)
    except RuntimeError as error:
        if "invalid hash value" not in str(error):
            raise
        got = re.search(r'got "([0-9a-f]+)"', str(error))
        raise ValueError(
            f"downloaded {what} ({url}) has sha256 {got.group(1) if got else '?'}, the manifest "
            f"expects {sha256}; nothing was written to {target}"
        ) from error
    except OSError as error:  # URLError, HTTPError, connection errors
        raise FileNotFoundError(
            f"could not download {url} to {target} ({type(error).__name__}: {error}). {where}"
        ) from error
    return target
