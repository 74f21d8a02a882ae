"""What every command shares: the app, options, error handling, progress, opening SRC.

A user error (an `EnsembleKernelError`, a typo'd option, a bad option value, a missing
argument) prints one line on stderr and exits with status 2; no traceback, no terminal
escape codes (control characters in the text, e.g. from a file name, are escaped).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import sys
import time
import unicodedata
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import torch
import typer
from rich.console import Console
from typer.core import TyperGroup
from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import __version__
from ..core._engine import Progress
from ..core._pilot import crowded_share as _crowded_share
from ..errors import EnsembleKernelError, InputError
from ..storage._formats import RunSet
from ..core._precision import PrecisionChoice, choose_precision
from ..storage._runs import Runs, open_runs
from ..core._sources import item_size

try:  # typer >= 0.2x vendors its own click; earlier releases use click itself
    from typer._click import exceptions as _click_errors
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover
    from click import exceptions as _click_errors
    from click import get_current_context


def one_line(text: str) -> str:
    """`text` as one printable line: whitespace runs become one space, other control
    characters (ESC of an ANSI sequence, say) are shown escaped, never sent raw."""
    text = " ".join(str(text).split())
    return "".join(ch if unicodedata.category(ch) != "Cc" else ascii(ch)[1:-1] for ch in text)


def say(line: str) -> None:
    """Write one line on stderr as plain text (no markup, no colour, no wrapping)."""
    sys.stderr.write(one_line(line) + "\n")
    sys.stderr.flush()


class OptionError(typer.BadParameter):
    """A bad option value whose message already names the option and the value."""

    def format_message(self) -> str:
        return self.message


def _given_value(argv: List[str], param) -> Optional[str]:
    """The text the user gave for option `param` on the command line, if found."""
    for opt in getattr(param, "opts", ()) or ():
        for i, arg in enumerate(argv):
            if arg == opt and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(opt + "="):
                return arg[len(opt) + 1:]
    return None


def _usage_line(e, argv: List[str]) -> str:
    """One line for a click usage error: what was wrong and where to read the usage."""
    message = e.format_message()
    param = getattr(e, "param", None)
    if isinstance(e, _click_errors.BadParameter) and not isinstance(e, OptionError):
        value = _given_value(argv, param) if param is not None else None
        if value is not None and repr(value) not in message:
            message = message.replace(": ", f" (got {value!r}): ", 1)
    ctx = getattr(e, "ctx", None)
    where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
    return f"error: {message.rstrip('.')}{where}"


_LIST_ITEM = re.compile(r"\s*([-*]|\d+\.)\s")


def _reflow(help_text: str) -> str:
    """A command's help with the line breaks of its docstring taken out of each paragraph
    (typer keeps them after the first paragraph, and rich then wraps each docstring line
    on its own: ragged text in an 80-column terminal). A line keeps its break where it
    starts a list item ("- ", "* ", "1. ") or, outside a list, is indented further than
    its paragraph's first line (a command shown on its own line); a paragraph starting with click's
    no-rewrap marker (a backspace, written \\b in a docstring) is left as it is."""
    paragraphs = []
    for paragraph in re.split(r"\n[ \t]*\n", inspect.cleandoc(help_text)):
        if paragraph.startswith("\b"):
            paragraphs.append(paragraph)
            continue
        lines: list[str] = []
        indent, in_list = len(paragraph) - len(paragraph.lstrip(" ")), False
        for line in paragraph.split("\n"):
            item = _LIST_ITEM.match(line) is not None
            in_list |= item  # (an item's further-indented lines go on with it)
            starts = item or not in_list and len(line) - len(line.lstrip(" ")) > indent
            if lines and not starts:
                lines[-1] += " " + line.strip()
            else:  # (a command keeps its indent: it shows so, and stays apart if reflowed)
                lines.append(line[indent:].rstrip() if not item else line.strip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


class _OneLineErrors(TyperGroup):
    """The app's command group: a usage error (typo'd option, bad value, missing argument)
    prints one line on stderr and exits with status 2, instead of a framed rich panel.
    Each command's help is reflowed to the terminal's width (`_reflow`)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        for command in self.commands.values():
            if command.help:
                command.help = _reflow(command.help)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_errors.NoArgsIsHelpError as e:  # no command: show the help
            if not standalone_mode:
                raise
            help_text = e.format_message()  # (rich help is printed when the error is made)
            if help_text.strip():
                typer.echo(help_text)
            sys.exit(2)
        except _click_errors.ClickException as e:
            if not standalone_mode:
                raise
            say(_usage_line(e, argv))
            sys.exit(2)
        except typer.Abort:
            if not standalone_mode:
                raise
            say("aborted")
            sys.exit(1)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        """Run the command; Ctrl-C prints "interrupted" and exits with status 130 (typer
        would turn it into a silent exit 130 before `main` could say so)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            say("interrupted")
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build a similarity kernel from the saved outputs of many training runs, and use it "
         "to predict (k-NN beats averaging the ensemble) and to explain.",
)
err = Console(stderr=True, highlight=False)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}
# The largest budget taken: what an int64 byte count holds (just under 8192PiB).
MAX_SIZE = 2**63 - 1


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000 bytes.

    Units from B to PB (powers of 1000) and KiB to PiB (powers of 1024), any case; the
    size is exact (no float rounding) and must lie in 1 byte .. MAX_SIZE, so '1000TB' and
    '1PB' are the same budget.
    """
    from fractions import Fraction

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or len(match.group(1)) > 40:
        raise InputError(f"--memory-budget takes a size such as 2GB, 512MiB or 1500000000 "
                         f"(bytes; units up to PB and PiB), got {text!r}")
    size = int(Fraction(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InputError(f"--memory-budget must be positive, got {text!r}")
    if size > MAX_SIZE:
        raise InputError(f"--memory-budget must be less than 8192PiB (2**63 bytes), "
                         f"got {text!r}")
    return size


# ---- shared options -------------------------------------------------------------------

SrcArg = typer.Argument(..., help="A store made by ingest, or run files: a .pt or .npz file, "
                                  "or a directory searched recursively for .pt files "
                                  "(lexicographic order). Several are concatenated along the "
                                  "runs.", show_default=False)
LabelsOpt = typer.Option(None, "--labels", help="An .npz with arrays labels_train and "
                                                "labels_test, when the run files carry none.")
RunsOpt = typer.Option(None, "--runs", help="Which runs: N for the first N, A:B for runs A "
                                            "to B-1 (counted from 0; A or B may be left out).")
NoLogSoftmaxOpt = typer.Option(False, "--no-log-softmax",
                               help="Standardise raw logits instead of log-softmax outputs.")
PRECISIONS = ("auto", "exact", "fast")


def _budget_value(value: Optional[str]) -> Optional[str]:
    if value is not None:
        try:
            parse_size(value)
        except InputError as e:
            raise OptionError(str(e)) from e
    return value


def check_device(value: str) -> str:
    """`value` if it names a device this machine has (cpu, cuda, cuda:N); else InputError."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"--device takes cpu, cuda or cuda:N, got {value!r}") from e
    if device.type == "cpu":
        return value
    if device.type != "cuda":
        raise InputError(f"--device takes cpu, cuda or cuda:N, got {value!r}")
    if not torch.cuda.is_available():
        raise InputError(f"--device {value}: no CUDA device is available here (this torch "
                         f"{torch.__version__} sees none); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return value


def _device_value(value: str) -> str:
    try:
        return check_device(value)
    except InputError as e:
        raise OptionError(str(e)) from e


def choice(option: str, values: tuple) -> Callable[[str], str]:
    """A callback that refuses, at parse time, a value of `option` outside `values`."""
    def check(value: str) -> str:
        if value not in values:
            raise OptionError(f"{option} takes {', '.join(values[:-1])} or {values[-1]}, "
                              f"got {value!r}")
        return value
    return check


PrecisionOpt = typer.Option(
    "auto", "--precision", callback=choice("--precision", PRECISIONS),
    help="auto: fast where a probe of this machine (cached) predicts it clearly faster, else "
         "exact; -v shows why. exact: float32 products. fast: bfloat16 candidates, then an "
         "exact float32 re-score (same neighbours).")
VerboseOpt = typer.Option(False, "--verbose", "-v",
                          help="Say which precision runs and why (the probe's rates and the "
                               "predicted time of each path), on stderr.")
BudgetOpt = typer.Option(None, "--memory-budget", callback=_budget_value,
                         show_default="a quarter of the available memory; with --device "
                                      "cuda, half of the GPU's free memory",
                         help="Working memory for the engine, e.g. 2GB or 512MiB (GPU memory "
                              "with --device cuda).")
DeviceOpt = typer.Option("cpu", "--device", callback=_device_value,
                         help="cpu, cuda or cuda:N: where the kernel is computed (the logits "
                              "are read on the host and copied there piece by piece).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")
MaxSubsetsOpt = typer.Option(
    None, "--max-subsets", min=1, show_default="3",
    help="Disjoint subsets of runs per run count in the sweep, at most. Each subset of n "
         "runs costs a kernel of n runs: with 3, the sweep's kernels cost about two kernels "
         "of all runs.")
FullSweepOpt = typer.Option(
    False, "--full-sweep",
    help="Every disjoint subset per run count (n_models // n of them): a tighter spread, "
         "about log2(n_models) kernels of all runs in all.")


SweepExamplesOpt = typer.Option(
    None, "--sweep-examples", show_default="2000",
    help="Test examples the sweep and its ablations are computed on, spread evenly over "
         "the test split (N, or 'all'). Their neighbours are exact; only the accuracies are "
         "estimates: near 95%, 0.5 points of standard error on 2,000. With all of CIFAR's "
         "10,000, the sweep costs about 3 more kernels of all runs.")


def sweep_examples(text: Optional[str]) -> Optional[int]:
    """--sweep-examples -> the sweep's `test_examples` (None: every test example)."""
    from ..analysis._sweep import DEFAULT_TEST_EXAMPLES

    if text is None:
        return DEFAULT_TEST_EXAMPLES
    text_ = text.strip(" \t")
    if text_.lower() == "all":
        return None
    # ASCII digits, optionally grouped by thousands (2000, 2_000, 2,000): '1,2' is a typo.
    grouped = re.fullmatch(r"[0-9]+|[0-9]{1,3}(?:,[0-9]{3})+|[0-9]{1,3}(?:_[0-9]{3})+", text_)
    value = int(text_.replace(",", "").replace("_", "")) if grouped and len(text_) < 40 else 0
    if value < 1:
        raise InputError(f"--sweep-examples takes a positive number of test examples or 'all', "
                         f"got {text!r}")
    return value


def sweep_subsets(max_subsets: Optional[int], full_sweep: bool) -> Optional[int]:
    """--max-subsets and --full-sweep -> the sweep's `max_subsets` (None: every subset)."""
    from ..analysis._sweep import DEFAULT_MAX_SUBSETS

    if full_sweep and max_subsets is not None:
        raise InputError(f"--full-sweep takes every disjoint subset and --max-subsets "
                         f"{max_subsets} caps them: give one of the two")
    if full_sweep:
        return None
    return DEFAULT_MAX_SUBSETS if max_subsets is None else max_subsets


# The library names its parameters in backticks (`k`) and in InputError.param; the
# command line shows its own option in their place. Where the option is not "--" and the
# parameter's name with dashes, it is named here.
_OPTION_OF = {"n_neighbors": "--neighbors",
              "labels_train": "--labels FILE.npz with labels_train",
              "labels_test": "--labels FILE.npz with labels_test"}


def in_cli_words(error: BaseException) -> str:
    """An error's message with the parameter it names written as this program's option."""
    text, param = str(error), getattr(error, "param", None)
    if param:
        option = _OPTION_OF.get(param, "--" + param.replace("_", "-"))
        text = text.replace(f"`{param}`=", f"{option} ").replace(f"`{param}`", option)
    return text


def _fail(message: str) -> None:
    say(f"error: {message}")
    raise typer.Exit(2)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn user errors into one line and exit 2; show warnings as one line each."""
    def show(message, category, filename, lineno, file=None, line=None):
        say(f"warning: {message}")

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    except EnsembleKernelError as e:
        _fail(in_cli_words(e))
    except OSError as e:  # an output path that cannot be written, a full disk
        _fail(f"{getattr(e, 'filename', None) or ''}: {e.strerror or e}".lstrip(": "))
    finally:
        warnings.showwarning = previous


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # (no such method; a closed stream)
        return False


@contextlib.contextmanager
def _stage_bar(quiet: bool) -> Iterator:
    """`update(stage, done, total, info="")` driving one rich bar per stage on stderr.

    Yields None (no bar) when quiet or when stderr is not a terminal, unless
    ENSEMBLE_KERNEL_PROGRESS=1. A terminal is a real one: FORCE_COLOR (which rich takes
    for one) draws no bar into a log. Where stderr is not a terminal, the bar is drawn
    as plain text, once, when it ends (its last state, a line per stage): no cursor
    codes, so that a line written after it (an error, say) is a clean line.
    """
    tty = _isatty(sys.stderr)
    if quiet or not tty and os.environ.get("ENSEMBLE_KERNEL_PROGRESS") != "1":
        yield None
        return
    bar = Bar(TextColumn("{task.description:<11}"), BarColumn(), TextColumn("{task.fields[info]}"),
              TimeElapsedColumn(), TimeRemainingColumn(),
              console=err if tty else Console(stderr=True, highlight=False, force_terminal=False),
              transient=tty)
    tasks: dict[str, int] = {}

    def update(stage: str, done: float, total: float, info: str = "") -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total, info="")
        bar.update(tasks[stage], completed=done, total=total, info=info)

    with bar:
        yield update


@contextlib.contextmanager
def _progress_bar(quiet: bool) -> Iterator:
    """A progress callback for the engine (or None), drawn by `_stage_bar`."""
    with _stage_bar(quiet) as update:
        if update is None:
            yield None
            return

        def report(p: Progress) -> None:
            if p.stage == "sweep":  # done: runs' worth of kernels; tiles: subsets
                update(p.stage, p.done, p.total, f"subset {p.tiles_done}/{p.n_tiles}")
                return
            tiles = (f", tile {p.tiles_done}/{p.n_tiles}"
                     if p.stage in ("kernel", "fallback", "ablations") else "")
            update(p.stage, p.done, p.total, f"{p.done}/{p.total} runs{tiles}")

        yield report


def _stash(name: str):
    """An option callback that keeps the value in the command's context for `_open`."""
    def keep(ctx: typer.Context, value):
        ctx.meta[f"ensemble_kernel.{name}"] = value
        return value
    return keep


CodeOpt = typer.Option(None, "--code", callback=_stash("code"), metavar="HASH-PREFIX",
                       help="Use only the runs of one training configuration: the first hex "
                            "digits of its code sha256 (info lists them). Without it, runs "
                            "whose code differs are used together, with a warning.")
TestKeyOpt = typer.Option(None, "--test-key", callback=_stash("test_key"), metavar="KEY",
                          help="The array of each run file that holds the test split, e.g. "
                               "logits_tta (the published test-time-augmented outputs); "
                               "default logits. Run files only (a store keeps what was "
                               "ingested).")


def _source_options() -> tuple[Optional[str], Optional[str]]:
    """(--code, --test-key) of the running command, if it has them."""
    ctx = get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    return meta.get("ensemble_kernel.code"), meta.get("ensemble_kernel.test_key")


def _open(src: List[Path], labels: Optional[Path], runs: Optional[str], *,
          code: Optional[str] = None, test_key: Optional[str] = None,
          needs_test: bool = True) -> tuple[Runs, slice]:
    """SRC, --labels and --runs opened as the library does it (`ensemble_kernel.open_runs`);
    --runs counts within the configuration --code chose. A SRC without test examples is
    refused (every command works on them), unless `needs_test` is False.

    `code` and `test_key` default to the command's --code and --test-key options (kept in
    its context by `CodeOpt` and `TestKeyOpt`).
    """
    stashed_code, stashed_key = _source_options()
    runset = open_runs(src, runs, labels=labels,
                       code=code if code is not None else stashed_code,
                       test_key=test_key if test_key is not None else stashed_key)
    if needs_test and runset.test.n_examples == 0:
        ctx = get_current_context(silent=True)
        command = ctx.info_name if ctx is not None and ctx.info_name else "this command"
        raise InputError(f"SRC ({', '.join(map(str, src))}) has 0 test examples; {command} "
                         "needs at least one")
    return runset, runset.runs


def within_split_note(runset: RunSet, command: str, what: str) -> bool:
    """True (with a note on stderr) when SRC has no train split and `command` works
    within the test split instead; False when it has one."""
    if runset.has_train:
        return False
    if runset.test.n_examples < 2:  # (an example's neighbours are the others: none)
        raise InputError(f"SRC has no train split and {runset.test.n_examples} test example; "
                         f"{command} within one split needs at least 2")
    say(f"note: {command}: SRC has no train split; {what} within its "
        f"{runset.test.n_examples} test examples, each example's own entry left out")
    return True


def require_train(runset: RunSet, command: str) -> None:
    """One line when `command` needs the train split that SRC lacks."""
    if not runset.has_train:
        raise InputError(f"{command} needs a train split (the references), but SRC holds test "
                         "logits only (no logits_train); evaluate, neighbors and duplicates "
                         "work within one split")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"--precision takes {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, "
                         f"got {precision!r}")


def resolve_precision(precision: str, runset: RunSet, k: int, *, device: str,
                      memory_budget: Optional[int], verbose: bool,
                      within: bool = False, log_softmax: bool = True) -> PrecisionChoice:
    """The precision a command runs ('exact' or 'fast') for its test -> train neighbours
    (test -> test with `within`, for a single-split SRC), chosen once
    (`precision.choose_precision`); with `verbose`, one line on stderr saying which and
    why. A forced 'fast' that the probe predicts slower warns (one line)."""
    n_references = runset.test.n_examples - 1 if within else runset.train.n_examples
    k = max(1, min(k, n_references))

    def crowding(plan) -> float:  # the pilot on the data (`_pilot.crowded_share`)
        return _crowded_share(runset.test, None if within else runset.train, k, plan,
                              n_candidates=None, log_softmax=log_softmax, classes=None,
                              memory_budget=memory_budget, device=device)
    choice = choose_precision(precision, n_queries=runset.test.n_examples,
                              n_references=n_references, n_models=runset.n_models,
                              n_classes=runset.n_classes, k=k,
                              memory_budget=memory_budget, device=device,
                              raw_bytes=item_size(runset.test), crowding=crowding,
                              log_softmax=log_softmax)
    if verbose:
        say(choice.describe())
    return choice


def check_k(option: str, k: int, n_references: int, default: int | None = None,
            what: str = "training examples") -> None:
    """A k the command will use must not exceed the references (`what` they are).

    The message names the option the user gave (or did not give: its default) and the fix.
    """
    if 1 <= k <= n_references:
        return
    given = f"its default {k}" if k == default else str(k)
    if n_references < 1:  # (not "between 1 and 0")
        raise InputError(f"{option} ({given}): there are no {what} to take neighbours from "
                         "(SRC has none)")
    raise InputError(f"{option} must be between 1 and {n_references} (the number of {what}), "
                     f"got {given}: pass {option} {max(1, n_references)} or less")


def parse_run_counts(text: Optional[str], n_models: int) -> Optional[List[int]]:
    """sweep's --runs '1,2,4,8' -> [1, 2, 4, 8], each between 1 and the runs available."""
    if text is None:
        return None
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError as e:
        raise InputError(f"--runs takes run counts such as 1,2,4,8, got {text!r}") from e
    bad = [c for c in counts if not 1 <= c <= n_models]
    if bad:
        raise InputError(f"--runs {text}: each run count must be between 1 and {n_models} (the "
                         f"runs in SRC), got {bad[0]}")
    return counts


# The sweep's weighted vote uses this many neighbours (the authors' k); so does the report's.
SWEEP_WEIGHTED_K = 20


def check_sweep_size(command: str, n_references: int) -> None:
    """sweep and report vote with k = 20: the training split must have 20 examples."""
    if n_references < SWEEP_WEIGHTED_K:
        raise InputError(f"{command} needs at least {SWEEP_WEIGHTED_K} training examples (its "
                         f"weighted vote uses the {SWEEP_WEIGHTED_K} nearest), but the train "
                         f"split of SRC has {n_references}: add training examples, or use "
                         f"evaluate --weighted-k {max(1, n_references)}")


def _meta(options: dict, runset: RunSet, runs: slice, started: float) -> dict:
    return {
        "ensemble_kernel_version": __version__,
        "torch_version": torch.__version__,
        "options": options,
        "n_models": runset.n_models,
        "runs": [runs.start, runs.stop],
        "sources": list(runset.sources),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def format_card(result) -> str:
    """The model card's four lines, in percent, for an `Evaluation`."""
    lines = [
        ("average single-model accuracy", result.single_model_accuracy),
        (f"ensemble accuracy ({result.n_models} models)", result.ensemble_accuracy),
        (f"kernel accuracy (k-NN w/ k={result.k})", result.knn_accuracy),
        (f"weighted k-NN accuracy (k={result.weighted_k}, K**{result.power})",
         result.weighted_accuracy),
    ]
    width = max(len(name) for name, _ in lines) + 1
    return "\n".join(f"{name:<{width}}: {100 * value:.2f}" for name, value in lines)
