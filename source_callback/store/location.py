"""Where a store lives: local paths and fsspec URLs, opened the same way for writer and reader."""

from __future__ import annotations

import os
from typing import Any, Literal

import fsspec
import zarr
from zarr.errors import BaseZarrError

from source_callback.errors import NotAStoreError

StorageOptions = dict[str, Any] | None


def normalize(url: str | os.PathLike[str]) -> str:
    """A store location as a string: local paths made absolute, URLs left as they are."""
    url = os.fspath(url)
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def _options(url: str, storage_options: StorageOptions) -> dict[str, Any] | None:
    if "://" not in url:
        return None
    options = dict(storage_options or {})
    if url.startswith("file://"):
        options.setdefault("auto_mkdir", True)  # zarr-python #2808
    return options


def has_content(url: str, storage_options: StorageOptions = None) -> bool:
    """Whether anything (a file, a non-empty folder) already exists at ``url``."""
    fs, path = fsspec.core.url_to_fs(url, **(_options(url, storage_options) or {}))
    if not fs.exists(path):
        return False
    if fs.isfile(path):
        return True
    return len(fs.ls(path, detail=False)) > 0


def open_existing(
    url: str, storage_options: StorageOptions, mode: Literal["r", "r+"]
) -> zarr.Group | None:
    """The Zarr group at ``url``; ``None`` when nothing is there.

    Raises
    ------
    NotAStoreError
        Something that is not a Zarr group is there (it is not touched).
    """
    try:
        root = open_group(url, storage_options, mode)
    except (FileExistsError, NotADirectoryError):  # a file where the store's folder would be
        root = None
    if root is None and has_content(url, storage_options):
        advice = (
            "Check the path; if it is a record, its root zarr.json is damaged or missing: "
            "restore it from a copy."
            if mode == "r"
            else "Choose an empty or new location to record into, or the path of an existing "
            "record; nothing was changed here."
        )
        raise NotAStoreError(
            f"{url} exists and is not a Zarr store (no readable zarr.json at its root), so not "
            f"a source-callback record. {advice}"
        )
    return root


def open_group(
    url: str, storage_options: StorageOptions, mode: Literal["r", "r+", "w-"]
) -> zarr.Group | None:
    """Open the Zarr v3 group at ``url``; ``None`` when there is no group there."""
    try:
        return zarr.open_group(
            store=url, mode=mode, zarr_format=3, storage_options=_options(url, storage_options)
        )
    except (BaseZarrError, FileNotFoundError, ValueError):
        # Nothing there, an array, or unreadable metadata: not a group either way.
        return None
