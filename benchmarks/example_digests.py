"""Cost of digesting every training example (``fingerprint.example_digests``).

The recorder digests a stage's training set once, on a background thread, while the stage
trains. This measures that pass on its own, for datasets of the shapes the examples use:

    python benchmarks/example_digests.py [--examples 20000]

It prints examples per second and microseconds per example for each dataset, and the time
one read of the same dataset through a DataLoader (batch 64) takes, side by side.
"""

from __future__ import annotations

import argparse
import time

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
    }
    print("| dataset | examples | digest (s) | µs per example | one DataLoader pass (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, data in datasets.items():
        digest = _seconds(lambda data=data: example_digests(data))
        read = _seconds(lambda data=data: [None for _ in DataLoader(data, batch_size=64)])
        print(f"| {name} | {n:,} | {digest:.2f} | {1e6 * digest / n:.1f} | {read:.2f} |")


if __name__ == "__main__":
    main()
