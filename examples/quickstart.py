"""ensemble-kernel from Python: the README's quick start with top-level names only.

    python examples/quickstart.py demo-output/store      # after `make demo`
    python examples/quickstart.py runs/ --labels labels.npz

Opens the runs, prints the model card's table, fits a KernelKNN, shows the nearest
training examples of one test example, and the most similar pairs. In a notebook, the
same objects show themselves as HTML tables and image grids (`_repr_html_`).
Argument order, everywhere: train first, then test.
"""

from __future__ import annotations

import argparse

import ensemble_kernel as ek


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="+", help="a store, run files or directories of them")
    parser.add_argument("--labels", help="an .npz with labels_train and labels_test")
    parser.add_argument("--example", type=int, default=0, help="the test example to explain")
    parser.add_argument("--code", help="one training configuration: a code sha256 prefix")
    parser.add_argument("--test-key", help="run files: the test split's array (logits_tta)")
    args = parser.parse_args(argv)
    try:
        quickstart(args)
    except ek.EnsembleKernelError as e:  # a user error: one line, exit status 2
        parser.exit(2, f"error: {e}\n")


def quickstart(args: argparse.Namespace) -> None:
    runs = ek.open_runs(args.src, labels=args.labels, code=args.code,  # train and test
                        test_key=args.test_key)                        # logits, labels
    print(runs)
    if not 0 <= args.example < runs.test.n_examples:
        raise ek.InputError(f"--example must be between 0 and {runs.test.n_examples - 1}, "
                            f"got {args.example}")

    # The model card's table (what `ensemble-kernel evaluate SRC` prints).
    evaluation = ek.evaluate(runs.train, runs.test, runs.labels_train, runs.labels_test)
    print(evaluation)

    # A classifier that reads like scikit-learn's: fit on train, predict test.
    model = ek.KernelKNN(k=3).fit(runs.train, runs.labels_train)
    print(model, "accuracy:", model.score(runs.test, runs.labels_test))
    values, indices = model.kneighbors(runs.test, k=5)
    i = args.example
    print(f"test example {i} (label {int(runs.labels_test[i])}): nearest training examples "
          f"{indices[i].tolist()}, K = {[round(v, 4) for v in values[i].tolist()]}, "
          f"labels {runs.labels_train[indices[i]].tolist()}")

    # A view: the test examples most similar to a training example (an image grid of the
    # inputs in a notebook, when the store has them).
    found = ek.top_k_neighbors(runs.train, runs.test, k=20)
    print(ek.pairs(found, runs, ranks="0:8"))
    print(ek.duplicates(found, runs))


if __name__ == "__main__":
    main()
