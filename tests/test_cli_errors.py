"""DESIGN §7: every user error is one line on stderr, exit status 2, no traceback.

One parametrised test runs every command of the app with each kind of bad option: a
typo'd option name, a bad value for every numeric option (0, negative, not a number),
bad enum values, a missing, nonexistent or wrong-typed SRC, and values that only the
data show to be wrong (k above the training examples, a train split smaller than the
default weighted k). The commands and their options are discovered from the app, so a
new command or a new numeric option is covered (or the test says what to add).
A few real subprocesses check the promise end to end, with colour forced on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ensemble_kernel.cli import app

from conftest import make_ensemble, save_labels, save_pt, write_fake_cifar

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands  # name -> click command

# Valid arguments for each command: with these alone it would run (`{x}` are fixtures).
BASE = {
    "evaluate": ["{src}", "--labels", "{labels}"],
    "neighbors": ["{src}", "--out", "{out}/n.npz"],
    "predict": ["{src}", "--labels", "{labels}", "--out", "{out}/p.csv"],
    "sweep": ["{src}", "--labels", "{labels}", "--out", "{out}/sweep"],
    "pairs": ["{src}", "--out", "{out}/views"],
    "duplicates": ["{src}", "--out", "{out}/views"],
    "failures": ["{src}", "--labels", "{labels}", "--out", "{out}/views"],
    "compare": ["{src}", "--labels", "{labels}", "--features", "{features}", "--out",
                "{out}/views"],
    "report": ["{src}", "--labels", "{labels}", "--out", "{out}/r.html"],
    "ingest": ["{src}", "--store", "{out}/store"],
    "info": ["{store}"],
    "verify": ["{store}"],
    "upgrade": ["{store}"],
    "demo": ["--out", "{out}/demo"],
    "labels": ["cifar10", "--root", "{cifar}", "--out", "{out}/labels.npz", "--reader", "pickle"],
    "label-issues": ["{src}", "--labels", "{labels}"],
}
# Numeric options for which 0, or a negative number, is a meaningful value.
ZERO_OK = {"--seed", "--threshold"}
NEGATIVE_OK = {"--threshold"}
# Enum-like text options: a bad value each.
ENUMS = {"--device": "foo", "--precision": "foo", "--dtype": "foo", "--dataset": "foo",
         "--memory-budget": "lots", "--runs": "x", "--ranks": "x", "--reader": "foo",
         "--code": "xyz", "--test-key": "nokey", "--split": "valid",
         "--score": "foo"}


def _long_options(command) -> list:
    return [p for p in command.params if getattr(p, "opts", None) and p.opts[0].startswith("--")
            and p.param_type_name == "option" and p.name != "help"]


def _is_numeric(param) -> bool:
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    name = getattr(getattr(param, "type", None), "name", "")
    return annotation in (int, float) or name in ("integer", "float", "integer range",
                                                 "float range")


def _without(args: list, option: str) -> list:
    """`args` less `option` and its value (so that a bad value replaces the good one)."""
    if option not in args:
        return list(args)
    i = args.index(option)
    return args[:i] + args[i + 2:]


def _typo(option: str) -> str:
    """'--precision' -> '--precison': one letter dropped, as a hurried user types it."""
    middle = len(option) // 2 + 1
    return option[:middle] + option[middle + 1:]


def _cases():
    cases = []
    for name, command in COMMANDS.items():
        base = BASE[name]
        options = _long_options(command)
        longest = max((p.opts[0] for p in options), key=len)
        cases.append((name, base + [_typo(longest)], _typo(longest)))
        for p in options:
            opt = p.opts[0]
            if _is_numeric(p):
                rest = _without(base, opt)
                cases.append((name, rest + [opt, "abc"], f"{opt}.*abc"))
                if opt not in ZERO_OK:
                    cases.append((name, rest + [opt, "0"], f"{opt}.*0"))
                if opt not in NEGATIVE_OK:
                    cases.append((name, rest + [opt, "-3"], f"{opt}.*-3"))
            if opt in ENUMS and not p.is_flag:
                cases.append((name, _without(base, opt) + [opt, ENUMS[opt]],
                              f"{opt}.*{ENUMS[opt]}"))
        if base and base[0] in ("{src}", "{store}"):
            cases.append((name, base[1:], "Missing argument"))
            cases.append((name, ["{tmp}/missing.pt"] + base[1:], "missing.pt: no such"))
            cases.append((name, ["{tmp}/notes.txt"] + base[1:], "notes.txt"))
        for extra in ("--inputs", "--features"):
            if extra in {p.opts[0] for p in options}:
                cases.append((name, _without(base, extra) + [extra, "{tmp}/notes.txt"],
                              "notes.txt" if name == "ingest" else f"notes.txt: {extra} takes"))
        if "--labels" in base:
            cases.append((name, _without(base, "--labels") + ["--labels", "{tmp}/notes.txt"],
                          "notes.txt: --labels takes an .npz"))
    # What only the data show: k above the 12 training examples of {small}; the named cases.
    cases += [
        ("evaluate", ["{src}", "--labels", "{labels}", "--device", "foo"], "--device.*'foo'"),
        ("evaluate", ["{src}", "--labels", "{labels}", "--weighted-k", "0"], "--weighted-k.*'0'"),
        ("evaluate", ["{src}", "--labels", "{labels}", "--k", "31"],
         "--k must be between 1 and 30 .*got 31: pass --k 30 or less"),
        ("evaluate", ["{small}", "--labels", "{small_labels}"],
         "--weighted-k must be between 1 and 12 .*got its default 20: pass --weighted-k 12"),
        ("neighbors", ["{small}", "--out", "{out}/n.npz"],
         "--k must be between 1 and 12 .*got its default 20"),
        ("neighbors", ["{src}", "--out", "{out}/n.csv"], "--out must name an .npz file"),
        ("predict", ["{small}", "--labels", "{small_labels}", "--weighted", "--out",
                     "{out}/p.csv"], "--weighted-k must be between 1 and 12 .*default 20"),
        ("predict", ["{src}", "--labels", "{labels}", "--k", "99", "--out", "{out}/p.csv"],
         "--k must be between 1 and 30 .*got 99"),
        ("predict", ["{src}", "--labels", "{labels}", "--out", "{out}/p.txt"],
         r"--out must end in .csv or .npz"),
        ("sweep", ["{small}", "--labels", "{small_labels}", "--out", "{out}/sweep"],
         "sweep needs at least 20 training examples .* has 12"),
        ("sweep", BASE["sweep"] + ["--runs", "1,9"], "--runs 1,9: .* between 1 and 4 .*got 9"),
        ("sweep", BASE["sweep"] + ["--max-subsets", "0"], "--max-subsets.*'0'"),
        ("sweep", BASE["sweep"] + ["--full-sweep", "--max-subsets", "2"],
         "--full-sweep takes every disjoint subset and --max-subsets 2 caps them: give one"),
        ("report", BASE["report"] + ["--max-subsets", "2", "--full-sweep"],
         "--full-sweep takes every disjoint subset and --max-subsets 2 caps them: give one"),
        ("demo", BASE["demo"] + ["--full-sweep", "--max-subsets", "1"],
         "--full-sweep takes every disjoint subset and --max-subsets 1 caps them: give one"),
        ("report", BASE["report"] + ["--full-swep"], "No such option: --full-swep"),
        ("report", BASE["report"] + ["--sweep-examples", "many"],
         "--sweep-examples takes a positive number of test examples or 'all', got 'many'"),
        ("failures", BASE["failures"] + ["--neighbors", "31"],
         "--neighbors must be between 1 and 30 .*got 31"),
        ("pairs", BASE["pairs"] + ["--ranks", "5:99"], "--ranks 5:99 is outside the 10 test"),
        ("report", ["{small}", "--labels", "{small_labels}", "--out", "{out}/r.html"],
         "report needs at least 20 training examples .* has 12"),
        ("report", ["{src}", "--labels", "{labels}", "--out", "{out}/r.txt"],
         "--out must name an .html file"),
        ("duplicates", BASE["duplicates"] + ["--threshold", "nan"], "--threshold .*nan"),
        ("ingest", BASE["ingest"] + ["--class-names", "a,b"], "2 class names given for 5"),
        ("info", ["{src}", "--test-key", "logits_tta"], "b.pt: --test-key logits_tta: no such"),
        ("info", ["{store}", "--test-key", "logits_tta"], "--test-key logits_tta applies to run files"),
        ("labels", ["cifar100", "--root", "{cifar}", "--out", "{out}/l.npz"],
         "DATASET takes cifar10, got 'cifar100'"),
        ("labels", ["cifar10", "--root", "{tmp}", "--out", "{out}/l.npz", "--reader", "pickle"],
         "no CIFAR-10 python batches under it .*cifar-10-batches-py/ lacks data_batch_1.* "
         "download cifar-10-python.tar.gz"),
        ("labels", BASE["labels"][:4] + ["{out}/l.csv"], "--out must name an .npz file"),
        ("evaluate", ["{src}", "--labels", "{labels}", "--code", "0123"],
         "--code 0123 matches none of the training configurations in .*b.pt: \\(no code\\)"),
        ("evaluate", ["{store}", "--labels", "{labels}", "--test-key", "logits_tta"],
         "--test-key logits_tta applies to run files, but .*st is a store"),
        ("evaluate", ["{src}", "--labels", "{labels}", "--test-key", "logits_tta"],
         r"b.pt: --test-key logits_tta: no such array in this file; keys found: "
         r"\['logits', 'logits_train'\]"),
        ("label-issues", BASE["label-issues"] + ["--split", "train", "--k", "30"],
         "--k must be between 1 and 29 .*got 30: pass --k 29 or less"),
        ("label-issues", BASE["label-issues"] + ["--k", "31"],
         "--k must be between 1 and 30 .*got 31"),
        ("label-issues", ["{src}", "--split", "test"],
         "label-issues --split test needs train labels, .*b.pt carries none: pass --labels"),
    ]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_errors")
    ens = make_ensemble(n_models=4, n_train=30, n_test=10)
    small = make_ensemble(n_models=4, n_train=12, n_test=10)
    paths = {"tmp": tmp, "src": save_pt(tmp / "b.pt", ens.train, ens.test),
             "labels": save_labels(tmp / "labels.npz", ens),
             "small": save_pt(tmp / "small.pt", small.train, small.test),
             "small_labels": save_labels(tmp / "small_labels.npz", small)}
    np.savez(tmp / "features.npz", features_train=np.ones((30, 3)), features_test=np.ones((10, 3)))
    paths["features"] = tmp / "features.npz"
    (tmp / "notes.txt").write_text("not a run file\n")
    code = runner.invoke(app, ["ingest", str(paths["src"]), "--store", str(tmp / "st"), "-q"])
    assert code.exit_code == 0, code.output
    paths["store"] = tmp / "st"
    write_fake_cifar(tmp / "cifar", n_per_batch=3)
    paths["cifar"] = tmp / "cifar"
    return paths


@pytest.fixture(autouse=True)
def no_demo(monkeypatch):
    """A bad option must stop demo before it trains anything: fail fast if it does not."""
    import ensemble_kernel.demo as demo

    def refuse(*args, **kwargs):
        raise AssertionError("demo started despite a bad option")

    monkeypatch.setattr(demo, "load_dataset", refuse)


def test_every_command_has_bad_option_cases():
    assert set(COMMANDS) == set(BASE), "give a new command its valid BASE arguments"
    covered = {name for name, _, _ in CASES}
    assert covered == set(COMMANDS)


def _assert_one_line_error(code: int, output: str, match: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    assert "\x1b" not in output, repr(output)  # no raw escape codes, ever
    lines = output.splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    assert re.search(match, lines[0]), (match, output)


@pytest.mark.parametrize("name,args,match", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_user_error_is_one_line_exit_2_naming_the_option(files, tmp_path, name, args, match):
    args = [a.format(out=tmp_path, **{k: str(v) for k, v in files.items()}) for a in args]
    result = runner.invoke(app, [name, *args], env={"COLUMNS": "60"})
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception)
    _assert_one_line_error(result.exit_code, result.output, match)


# ---- end to end: a real process, colour forced on, a narrow terminal ----------------------

def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(TERM="xterm-256color", FORCE_COLOR="1", TTY_COMPATIBLE="1", COLUMNS="40",
               CLICOLOR_FORCE="1")
    done = subprocess.run([sys.executable, "-m", "ensemble_kernel", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("args,match", [
    (["evaluate", "{src}", "--precison", "fast"], r"No such option: --precison"),
    (["neighbors", "{src}", "--out", "{tmp}/n.npz", "--device", "foo"], "--device .*'foo'"),
    (["evaluate", "{tmp}/\x1b[31mred.pt"], r"\\x1b\[31mred.pt: no such file or directory"),
])
def test_a_real_process_prints_one_plain_line(tmp_path, args, match):
    ens = make_ensemble(n_models=3, n_train=20, n_test=5)
    src = save_pt(tmp_path / "b.pt", ens.train, ens.test)
    args = [a.format(src=src, tmp=tmp_path) for a in args]
    code, output = _run(args, tmp_path)
    _assert_one_line_error(code, output, match)
