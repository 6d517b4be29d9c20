"""Which training digits, and which stage, made the fine-tuned model classify a digit?

Run examples/two_stage_digits.py first; this reads its store and attributes the loss of
held-out digits (in the fine-tuning orientation) to the training examples of both stages,
then prints the most helpful and most harmful ones and each stage's effect.

    python examples/attribute_digits.py [--store runs/digits.zarr] [--queries 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.utils.data import Subset
from two_stage_digits import DigitsMLP, rotated_digits, training_sets

from source_callback import analyze


def attribute(store: Path, num_queries: int, segments: int, verbose: bool = True) -> None:
    """Analyze the record and print the top examples and stage effects per query."""
    train = training_sets()
    queries = Subset(rotated_digits([3], held_out=True), range(num_queries))
    result = analyze(
        store,
        model=DigitsMLP(),
        task="classification",  # measurement: the query's cross-entropy loss
        train=train,
        queries=queries,
        segments=segments,
        batch_size=256,
        verbose=verbose,
    )
    for q in range(num_queries):
        label = int(queries[q][1])
        helpful, harmful = result.top(q, k=3)
        print(f"\nquery {q} (a {label}, rotated 270°)")
        for title, items in (("most helpful", helpful), ("most harmful", harmful)):
            print(f"  {title}:")
            for item in items:
                digit = int(train[item.stage][item.index][1])
                print(f"    {item.stage:<8} #{item.index:<5} a {digit}  score {item.score:+.2e}")
        effects = ", ".join(
            f"{name} {value:+.3f}"
            for name, value in zip(result.stage_names, result.stage_effects[q], strict=True)
        )
        print(f"  stage effects on the loss (removing the stage): {effects}")
        last, exact = result.stage_names[-1], result.last_stage_exact[q]
        print(f"  exact effect of removing {last}: {exact:+.3f}")
    print(f"\nscores saved in {store} under analyses/default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("runs/digits.zarr"))
    parser.add_argument("--queries", type=int, default=4, help="held-out digits to attribute")
    parser.add_argument("--segments", type=int, default=3, help="segments per stage")
    args = parser.parse_args()
    attribute(args.store, args.queries, args.segments)


if __name__ == "__main__":
    main()
