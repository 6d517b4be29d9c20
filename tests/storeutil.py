"""Helpers to compare stores on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: str | Path) -> dict[str, str]:
    """Hash of every file under ``root`` by relative path (to prove nothing changed)."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
