"""Number and range options, and SRCs without examples: one line on stderr, exit 2.

("Nothing silent": --memory-budget units, --runs, 0 test examples, k with no references.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ensemble_kernel.cli.common import parse_size
from ensemble_kernel.errors import InputError
from ensemble_kernel.core._sources import parse_runs

from conftest import make_ensemble, run_cli


def _npz(path, train=True, n_test=40, n_train=120):
    ens = make_ensemble(n_models=4, n_train=max(n_train, 1), n_test=max(n_test, 1))
    arrays = dict(logits_test=ens.test.numpy()[:, :n_test],
                  labels_test=ens.labels_test.numpy()[:n_test])
    if train:
        arrays.update(logits_train=ens.train.numpy()[:, :n_train],
                      labels_train=ens.labels_train.numpy()[:n_train])
    np.savez(path, **arrays)
    return path


def _one_line_error(code: int, stderr: str, match: str) -> None:
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert match in stderr, stderr
    assert "between 1 and 0" not in stderr and "Traceback" not in stderr


def test_memory_budget_units_up_to_pb_are_consistent(tmp_path):
    assert parse_size("1000TB") == parse_size("1PB") == parse_size("1pb") == 10**15
    assert parse_size("1PiB") == 1024 * parse_size("1TiB") == 2**50
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("0.1KB") == 100
    too_large = r"--memory-budget must be less than 8192PiB \(2\*\*63 bytes\)"
    for text in ("8192PiB", "10000000TB", "9223372036854775808"):
        with pytest.raises(InputError, match=too_large):
            parse_size(text)
    assert parse_size("9223372036854775807") == 2**63 - 1  # exact, no float rounding
    with pytest.raises(InputError, match=r"units up to PB and PiB\), got '1EB'"):
        parse_size("1EB")
    src = _npz(tmp_path / "r.npz")
    assert run_cli("evaluate", src, "--memory-budget", "1PB")[0] == 0
    code, _, stderr = run_cli("evaluate", src, "--memory-budget", "8192PiB")
    _one_line_error(code, stderr, "--memory-budget must be less than 8192PiB")


def test_runs_empty_or_negative_is_refused(tmp_path):
    assert parse_runs(None, 6) == slice(0, 6) and parse_runs(":", 6) == slice(0, 6)
    assert parse_runs("2:", 6) == slice(2, 6) and parse_runs("4", 6) == slice(0, 4)
    for spec in ("", "  "):
        with pytest.raises(InputError, match="--runs is empty: use N with 2 <= N <= 6, or A:B "
                                             "with 0 <= A < B <= 6"):
            parse_runs(spec, 6)
    for spec in ("-3:", "1:-1", "-2"):
        with pytest.raises(InputError, match=f"--runs {spec}: run numbers count from 0 and "
                                             "cannot be negative"):
            parse_runs(spec, 6)
    src = _npz(tmp_path / "r.npz")
    _one_line_error(*run_cli("evaluate", src, "--runs", "")[::2], "--runs is empty")
    _one_line_error(*run_cli("evaluate", src, "--runs", "-3:")[::2], "cannot be negative")
    code, _, stderr = run_cli("sweep", src, "--runs", "", "--out", tmp_path / "sweep")
    _one_line_error(code, stderr, "--runs takes run counts such as 1,2,4,8, got ''")


COMMANDS = {
    "evaluate": [], "neighbors": ["--out", "{out}/n.npz"], "predict": ["--out", "{out}/p.csv"],
    "sweep": ["--out", "{out}/sweep"], "report": ["--out", "{out}/r.html"],
    "pairs": ["--out", "{out}/v"], "duplicates": ["--out", "{out}/v"],
    "failures": ["--out", "{out}/v"], "label-issues": [],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_zero_test_examples_is_refused_in_one_line(tmp_path, command):
    src = _npz(tmp_path / "r.npz", n_test=0)
    args = [a.replace("{out}", str(tmp_path / "out")) for a in COMMANDS[command]]
    code, stdout, stderr = run_cli(command, src, *args)
    _one_line_error(code, stderr, f"r.npz) has 0 test examples; {command} needs at least one")
    assert not (tmp_path / "out").exists() and "nan" not in stdout


def test_label_issues_on_the_train_split_needs_no_test_examples(tmp_path):
    src = _npz(tmp_path / "r.npz", n_test=0)
    code, stdout, stderr = run_cli("label-issues", src, "--split", "train")
    assert code == 0, stderr
    assert "of 120 train examples flagged" in stdout


@pytest.mark.parametrize("command,args", [
    ("evaluate", ["--k", "1", "--weighted-k", "1"]), ("neighbors", ["--out", "{out}/n.npz"]),
    ("duplicates", ["--out", "{out}/v"])])
def test_one_example_within_its_split_is_refused_in_one_line(tmp_path, command, args):
    src = _npz(tmp_path / "one.npz", train=False, n_test=1)  # one example, no train split
    args = [a.replace("{out}", str(tmp_path / "out")) for a in args]
    code, _, stderr = run_cli(command, src, *args)
    _one_line_error(code, stderr, f"SRC has no train split and 1 test example; {command} "
                                  "within one split needs at least 2")


def test_k_with_no_references_says_there_are_none(tmp_path):
    from ensemble_kernel.cli.common import check_k
    from ensemble_kernel.core._engine import top_k_neighbors

    with pytest.raises(InputError, match=r"^--k \(its default 3\): there are no other test "
                                         r"examples to take neighbours from \(SRC has none\)$"):
        check_k("--k", 3, 0, default=3, what="other test examples")
    ens = make_ensemble(n_models=3, n_test=1)
    with pytest.raises(InputError, match="k=1: there are no references other than the query "
                                         r"itself to take neighbours from \(1 example in all\)"):
        top_k_neighbors(ens.test, k=1)
    src = _npz(tmp_path / "two.npz", n_train=1, n_test=3)
    code, _, stderr = run_cli("label-issues", src, "--split", "train", "--k", "1")
    _one_line_error(code, stderr, "--k 1: there are no training examples to vote on another "
                                  "example (the train split has 1)")


def test_kernel_knn_score_of_zero_test_examples_is_an_error():
    import ensemble_kernel as ek

    ens = make_ensemble(n_models=3)
    model = ek.KernelKNN(k=3).fit(ens.train, ens.labels_train)
    with pytest.raises(InputError, match="KernelKNN.score: the test logits have 0 examples"):
        model.score(ens.test[:, :0], ens.labels_test[:0])


def test_the_library_refuses_to_evaluate_no_test_examples():
    """Not nan: an accuracy of nothing is an error in the library too."""
    import ensemble_kernel as ek
    from ensemble_kernel.analysis._evaluation import accuracy

    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(3, 20, 4, generator=g), torch.randn(3, 0, 4, generator=g)
    labels = torch.arange(20) % 4
    with pytest.raises(ek.InputError, match="at least one test example"):
        ek.evaluate(train, test, labels, torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ek.InputError, match="no examples to score"):
        accuracy(torch.zeros(0), torch.zeros(0))
