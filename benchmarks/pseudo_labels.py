"""Drawing a language model's pseudo-labels: ``torch.multinomial`` against ``sample_labels``.

The sampled Fisher draws one next token per position of every batch from the model's softmax.
This times the two ways side by side, alternated, on random logits of a batch of 8 sequences
of 128 tokens, for several vocabulary sizes: ``torch.multinomial`` on the float64
probabilities (what the analysis did before 2026-12-07: it needs them all, on the CPU
generator's device) and ``task.sample_labels`` (inverse CDF on the logits' device, a block of
positions at a time, one uniform per position from the CPU generator).

    python benchmarks/pseudo_labels.py [--vocab 1000 32000 128000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from source_callback.analysis.task import sample_labels


def multinomial(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The earlier draw: float64 probabilities of every position at once, on the CPU."""
    probs = torch.softmax(logits.double(), dim=-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[1000, 32000, 128000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    print(
        f"batch {args.batch} x {args.tokens} tokens, torch threads {torch.get_num_threads()}, "
        f"median of {args.rounds} alternated rounds\n"
    )
    print("| vocabulary | torch.multinomial (ms) | sample_labels (ms) | ratio |")
    print("|---:|---:|---:|---:|")
    generator = torch.Generator()
    for vocab in args.vocab:
        logits = torch.randn(args.batch, args.tokens - 1, vocab)
        times: dict[str, list[float]] = {"multinomial": [], "sample_labels": []}
        for _ in range(args.rounds):
            for name, draw in (("multinomial", multinomial), ("sample_labels", sample_labels)):
                generator.manual_seed(0)
                start = time.perf_counter()
                draw(logits, generator)
                times[name].append(1e3 * (time.perf_counter() - start))
        old, new = (statistics.median(times[k]) for k in ("multinomial", "sample_labels"))
        print(f"| {vocab:,} | {old:.1f} | {new:.1f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
