"""Label issues from the runs against cleanlab, on MNIST-1D with flipped labels (issue 11).

    python benchmarks/label_noise.py                    # 32 networks per ensemble, CV at 10% only
    python benchmarks/label_noise.py --cv-noise all     # cross-validated cleanlab at every level
    python benchmarks/label_noise.py --models 192 --cv-noise all   # the demo's ensemble size
    python benchmarks/label_noise.py --noise 0.1 --cv-noise ''     # one level, no cross-validation

Cost, in trainings of one ensemble on 4,000 examples: 1 (clean) + 1 per level + 4 per
level with cross-validation; the default is 1 + 3 + 4 = 8 ensembles of 32 networks, the
demo's 192 networks about 1.3 times over (about 3 minutes on 2 quiet cores).

The demo's data (4,000 / 1,000 MNIST-1D signals), networks and recipe. Labels are flipped
at each noise level, each to a uniformly chosen other class, exactly round(rate * n)
examples, from a fixed seed per level.

- Test split: one ensemble trained on the clean train labels; the test labels are flipped.
  The kernel's ranking (test -> train neighbours) against cleanlab's `find_label_issues`
  and `get_label_quality_scores` given the ensemble's averaged probabilities, and against
  the ensemble average's own margin.
- Train split: one ensemble per level trained on the flipped train labels. The kernel's
  leave-one-out ranking against cleanlab given (a) the ensemble's in-sample probabilities
  and (b) 5-fold cross-validated probabilities (the same recipe and ensemble size on each
  4/5, predicting the held-out fifth: cleanlab's protocol, at 4x the training).

Metrics: AUROC, average precision, precision and recall at the number of flipped labels
(the top-n of the ranking), precision and recall of each method's own flagged set, and
wall time (training included). Trained logits are cached in benchmarks/_data/label_noise/
(never committed), so a rerun only re-scores; --retrain discards them.
Results: benchmarks/_data/label_noise.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ensemble_kernel.demo.data import load_dataset
from ensemble_kernel.demo.train import TrainConfig, init_ensemble, predict, train_ensemble
from ensemble_kernel.analysis._label_issues import ensemble_probabilities, label_issues

HERE = Path(__file__).resolve().parent
CACHE = HERE / "_data" / "label_noise"


def flip(labels: np.ndarray, rate: float, n_classes: int, seed: int) -> np.ndarray:
    """Exactly round(rate * n) labels, each moved to a uniformly chosen other class."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    chosen = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
    out[chosen] = (labels[chosen] + rng.integers(1, n_classes, size=len(chosen))) % n_classes
    return out


def train(x: np.ndarray, y: np.ndarray, evaluate_on: list[np.ndarray], models: int,
          seed: int, batch_models: int = 32) -> tuple[list[torch.Tensor], float]:
    """The demo's recipe on (x, y): logits (n_models, n, n_classes) on each of `evaluate_on`."""
    started = time.perf_counter()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    outs: list[list[torch.Tensor]] = [[] for _ in evaluate_on]
    for b in range(0, models, batch_models):
        seeds = [seed * 1_000_003 + i for i in range(b, min(b + batch_models, models))]
        ensemble = train_ensemble(init_ensemble(seeds, x.shape[1], 10), xt, yt, TrainConfig())
        for out, xe in zip(outs, evaluate_on):
            out.append(predict(ensemble, torch.from_numpy(xe))[0])
    return [torch.cat(o) for o in outs], time.perf_counter() - started


def cached(name: str, make, retrain: bool, models: int | None = None):
    """(tensors, seconds) from CACHE/name.pt, or made by `make()` and saved there.

    With `models`, a cached ensemble of more networks (the same seeds) serves too: its
    first `models` runs, and the time scaled by the ratio (each network trains alone:
    demo.train's grouped computation keeps them independent).
    """
    path = CACHE / f"{name}.pt"
    if models is not None and not path.exists() and not retrain:
        bigger = sorted(CACHE.glob(name.replace(f"_m{models}_", "_m*_") + ".pt"))
        for other in bigger:
            size = int(other.stem.split("_m")[1].split("_")[0])
            if size > models:
                saved = torch.load(other, weights_only=True)
                return ([t[:models] for t in saved["logits"]],
                        float(saved["seconds"]) * models / size)
    if path.exists() and not retrain:
        saved = torch.load(path, weights_only=True)
        return saved["logits"], float(saved["seconds"])
    logits, seconds = make()
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"logits": logits, "seconds": seconds}, path)
    return logits, seconds


def metrics(scores: np.ndarray, is_flipped: np.ndarray, flagged: np.ndarray | None) -> dict:
    """AUROC, AP, precision = recall at n_flipped, and the flagged set's precision/recall."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    n = int(is_flipped.sum())
    top = np.argsort(-scores, kind="stable")[:n]
    out = {"auroc": roc_auc_score(is_flipped, scores),
           "ap": average_precision_score(is_flipped, scores),
           "p_at_n": float(is_flipped[top].mean())}
    if flagged is not None:
        hit = int((flagged & is_flipped).sum())
        out.update(n_flagged=int(flagged.sum()),
                   flag_precision=hit / max(1, int(flagged.sum())), flag_recall=hit / n)
    return out


def cleanlab_scores(given: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """cleanlab's label quality scores (as 1 - quality) and find_label_issues' mask."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    started = time.perf_counter()
    quality = get_label_quality_scores(given, probs)
    mask = find_label_issues(given, probs)
    return 1 - quality, mask, time.perf_counter() - started


def margin_scores(given: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Minus the ensemble's margin: q[given] - max over other classes of q."""
    p_given = probs[np.arange(len(given)), given]
    others = probs.copy()
    others[np.arange(len(given)), given] = -np.inf
    return -(p_given - others.max(axis=1))


def kernel_rows(train_logits, test_logits, labels_train, labels_test, split, k, power):
    rows = {}
    for score in ("kernel", "combined"):
        started = time.perf_counter()
        found = label_issues(train_logits, test_logits, torch.from_numpy(labels_train),
                             None if labels_test is None else torch.from_numpy(labels_test),
                             split=split, k=k, power=power, score=score)
        rows[score] = (found.scores.numpy(), found.flagged.numpy(),
                       time.perf_counter() - started)
    return rows


def cross_validated(x, y, models, seed, folds, name, retrain):
    """Out-of-fold averaged probabilities from `folds` ensembles (StratifiedKFold on y)."""
    from sklearn.model_selection import StratifiedKFold

    probs = np.zeros((len(y), 10))
    seconds = 0.0
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for f, (fit, held) in enumerate(split.split(x, y)):
        (logits,), s = cached(f"{name}_fold{f}",
                              lambda: train(x[fit], y[fit], [x[held]], models, seed + f),
                              retrain)
        probs[held] = ensemble_probabilities(logits).numpy()
        seconds += s
    return probs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=32, help="networks per ensemble")
    parser.add_argument("--noise", default="0.05,0.1,0.2", help="flip rates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--power", type=int, default=4)
    parser.add_argument("--cv-noise", default="0.1", help="flip rates at which to run the "
                        "cross-validated cleanlab (4x the training each): 'all', or rates")
    parser.add_argument("--test-only", action="store_true", help="only the test-split audit "
                        "(one training, on the clean labels)")
    parser.add_argument("--grid", action="store_true", help="only the test split at each "
                        "noise level: AP for k in 10, 20, 50 and power 1, 4, both scores")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached logits")
    parser.add_argument("--out", type=Path, default=HERE / "_data" / "label_noise.json")
    args = parser.parse_args()
    data = load_dataset("mnist1d")
    x_train, x_test = data.signals("train"), data.signals("test")
    y_train, y_test = data.y_train, data.y_test
    m = args.models
    results = []

    (lo_train, lo_test), t_clean = cached(
        f"clean_m{m}_s{args.seed}",
        lambda: train(x_train, y_train, [x_train, x_test], m, args.seed), args.retrain, m)
    q_test = ensemble_probabilities(lo_test).numpy()
    if args.grid:
        return print_grid(lo_train, lo_test, y_train, y_test, q_test, args)
    for rate in (float(r) for r in args.noise.split(",")):
        level = round(1000 * rate)  # seeds depend on the rate, not on its place in --noise
        # test split: clean training, flipped test labels
        given = flip(y_test, rate, 10, seed=10_000 * args.seed + level)
        truth = given != y_test
        rows = kernel_rows(lo_train, lo_test, y_train, given, "test", args.k, args.power)
        cl, mask, t_cl = cleanlab_scores(given, q_test)
        entries = [("kernel", *rows["kernel"], t_clean),
                   ("kernel + ensemble (combined)", *rows["combined"], t_clean),
                   ("cleanlab, ensemble probabilities", cl, mask, t_cl, t_clean),
                   ("ensemble margin", margin_scores(given, q_test), None, 0.0, t_clean)]
        for method, scores, flagged, t_score, t_train in entries:
            results.append({"split": "test", "noise": rate, "method": method,
                            "wall_s": t_train + t_score, "train_s": t_train, "trained": m,
                            **metrics(scores, truth, flagged)})

        if args.test_only:
            continue
        # train split: training on the flipped labels
        noisy = flip(y_train, rate, 10, seed=10_000 * args.seed + 5_000 + level)
        truth = noisy != y_train
        (lo_noisy,), t_noisy = cached(
            f"noisy{rate}_m{m}_s{args.seed}",
            lambda: train(x_train, noisy, [x_train], m, 100 * args.seed + 1 + level),
            args.retrain)
        rows = kernel_rows(lo_noisy, None, noisy, None, "train", args.k, args.power)
        q_in = ensemble_probabilities(lo_noisy).numpy()
        cl, mask, t_cl = cleanlab_scores(noisy, q_in)
        entries = [("kernel (leave-one-out)", *rows["kernel"], t_noisy),
                   ("kernel + ensemble (combined)", *rows["combined"], t_noisy),
                   ("cleanlab, in-sample probabilities", cl, mask, t_cl, t_noisy),
                   ("ensemble margin (in-sample)", margin_scores(noisy, q_in), None, 0.0,
                    t_noisy)]
        if args.cv_noise == "all" or rate in [float(r) for r in args.cv_noise.split(",") if r]:
            q_cv, t_cv = cross_validated(x_train, noisy, m, 100 * args.seed + 20_000 + 10 * level,
                                         args.folds, f"cv{rate}_m{m}_s{args.seed}",
                                         args.retrain)
            cl, mask, t_cl = cleanlab_scores(noisy, q_cv)
            entries.append((f"cleanlab, {args.folds}-fold cross-validated", cl, mask, t_cl,
                            t_cv))
        for method, scores, flagged, t_score, t_train in entries:
            trained = m * (args.folds - 1) if "cross-validated" in method else m
            results.append({"split": "train", "noise": rate, "method": method,
                            "wall_s": t_train + t_score, "train_s": t_train, "trained": trained,
                            **metrics(scores, truth, flagged)})
        print(f"noise {rate}: done", flush=True)

    record = {"models": m, "seed": args.seed, "k": args.k, "power": args.power,
              "folds": args.folds, "cpu": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(table(results, m))


def print_grid(lo_train, lo_test, y_train, y_test, q_test, args) -> None:
    """Average precision on the test split for a small grid of (k, power), both scores."""
    for rate in (float(r) for r in args.noise.split(",")):
        given = flip(y_test, rate, 10, seed=10_000 * args.seed + round(1000 * rate))
        truth = given != y_test
        cl = metrics(cleanlab_scores(given, q_test)[0], truth, None)["ap"]
        print(f"noise {rate:.0%}, {args.models} runs: cleanlab AP {cl:.3f}")
        for k in (10, 20, 50):
            for power in (1, 4):
                aps = [metrics(label_issues(lo_train, lo_test, torch.from_numpy(y_train),
                                            torch.from_numpy(given), k=k, power=power,
                                            score=score).scores.numpy(), truth, None)["ap"]
                       for score in ("kernel", "combined")]
                print(f"  k={k:<3} power={power}: kernel AP {aps[0]:.3f}, combined AP {aps[1]:.3f}")


def table(results: list[dict], models: int) -> str:
    def pct(r, key):
        return f"{r[key]:.3f}" if key in r else "-"

    lines = [f"ensembles of {models} networks; trained: networks trained on 4,000 examples' "
             "worth; wall = training + scoring, seconds",
             "| split | noise | method | AUROC | AP | P=R@n | flagged | flag P | flag R | "
             "trained | wall |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['split']} | {100 * r['noise']:.0f}% | {r['method']} | "
                     f"{r['auroc']:.3f} | {r['ap']:.3f} | {r['p_at_n']:.3f} | "
                     f"{r.get('n_flagged', '-')} | {pct(r, 'flag_precision')} | "
                     f"{pct(r, 'flag_recall')} | {r['trained']} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
