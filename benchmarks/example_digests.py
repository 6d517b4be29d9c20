"""Cost of digesting every training example (``fingerprint.example_digests``).

The recorder digests a stage's training set once, on a background thread, while the stage
trains. This measures that pass on its own, for datasets of the shapes the examples use:

    python benchmarks/example_digests.py [--examples 20000]

It prints examples per second and microseconds per example for each dataset, and the time
one read of the same dataset through a DataLoader (batch 64) takes, side by side. Tokenized
rows are measured as tensors and as the Python lists a tokenized Hugging Face ``datasets``
dataset gives (without ``set_format``), also through ``datasets.Dataset`` itself where
``datasets`` is installed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from source_callback.fingerprint import example_digests


class Tokens(Dataset):
    """Hugging Face-style items: ``input_ids`` and ``attention_mask`` of 128 tokens."""

    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 32000, (n, 128))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(128, dtype=torch.long)}


class TokenLists(Dataset):
    """Tokenized rows as Python lists: ``input_ids``, ``attention_mask`` and ``labels``."""

    def __init__(self, n: int, length: int = 512) -> None:
        self.ids = torch.randint(0, 32000, (n, length)).tolist()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}


def _hf_dataset(n: int, length: int = 512) -> Any:
    """The same rows in a ``datasets.Dataset`` (Arrow), or ``None`` without ``datasets``."""
    try:
        import datasets
    except ImportError:
        return None
    ids = torch.randint(0, 32000, (n, length)).numpy()
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": ids * 0 + 1, "labels": ids}
    )


def _collate_lists(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """What a padding collator does with rows of equal length."""
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20000)
    n = parser.parse_args().examples
    datasets = {
        "digits (64 floats, label)": TensorDataset(torch.randn(n, 64), torch.randint(0, 10, (n,))),
        "images (3x32x32 floats, label)": TensorDataset(
            torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
        ),
        "token sequences (2 x 128 ints)": Tokens(n),
        "tokenized rows, Python lists (3 x 512 ints)": TokenLists(n),
        "tokenized rows, `datasets.Dataset` (3 x 512 ints)": _hf_dataset(n),
    }
    print("| dataset | examples | digest (s) | µs per example | one DataLoader pass (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, data in datasets.items():
        if data is None:
            continue
        collate = _collate_lists if "rows" in name else None
        digest = _seconds(lambda data=data: example_digests(data))
        read = _seconds(
            lambda data=data, collate=collate: [
                None for _ in DataLoader(data, batch_size=64, collate_fn=collate)
            ]
        )
        print(f"| {name} | {n:,} | {digest:.2f} | {1e6 * digest / n:.1f} | {read:.2f} |")


if __name__ == "__main__":
    main()
