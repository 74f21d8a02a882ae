"""Small seeded ensembles and a 'same neighbours' check, shared by the tests."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_kernel.testing import assert_same_neighbors as _assert_same_neighbors

torch.set_num_threads(1)  # small tensors: one thread is faster and steadier on 2 cores


@pytest.fixture(autouse=True)
def _precision_probe_cache(tmp_path_factory, monkeypatch):
    """precision='auto' never reads or writes the user's cache during the tests (each test
    gets an empty cache folder, inherited by its subprocesses). The tests' jobs are below
    `precision.SMALL_JOB_FLOP`, so none probes; tests that need a probe inject one."""
    monkeypatch.setenv("ENSEMBLE_KERNEL_CACHE_DIR", str(tmp_path_factory.mktemp("ek-cache")))


@dataclass
class Ensemble:
    train: torch.Tensor  # (n_models, n_train, n_classes) float32
    test: torch.Tensor  # (n_models, n_test, n_classes)
    labels_train: torch.Tensor
    labels_test: torch.Tensor


def make_ensemble(seed: int = 0, n_models: int = 6, n_train: int = 120, n_test: int = 40,
                  n_classes: int = 5, noise: float = 1.0) -> Ensemble:
    """Logits with class structure: a per-example signal shared by every run, plus run noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(n_classes, n_classes, generator=g) * 3

    def split(n):
        labels = torch.randint(0, n_classes, (n,), generator=g)
        example = prototypes[labels] + torch.randn(n, n_classes, generator=g)
        runs = example[None] + noise * torch.randn(n_models, n, n_classes, generator=g)
        return runs, labels

    train, ytr = split(n_train)
    test, yte = split(n_test)
    return Ensemble(train, test, ytr, yte)


@pytest.fixture
def ensemble() -> Ensemble:
    return make_ensemble()


# The contract's comparison (docs/architecture.md §1), public for users' tests too.
assert_same_neighbors = _assert_same_neighbors


class ExactRows:
    """How many queries fast mode computed whole in float32, read from the engine's log line.

    `inline`: in the re-score's own pass; `fallback`: in a second exact pass. Use through
    the `exact_rows` fixture, then call `.counts()` after the computation.
    """

    _LINE = re.compile(r"(\d+) queries computed whole in the same pass; (\d+) of \d+ "
                       r"queries recomputed exactly")

    def __init__(self, caplog):
        self.caplog = caplog
        caplog.set_level(logging.INFO, logger="ensemble_kernel.core._engine")

    def counts(self) -> tuple[int, int]:
        found = [self._LINE.search(r.getMessage()) for r in self.caplog.records]
        found = [m for m in found if m]
        assert found, "no fast-mode summary line was logged"
        return sum(int(m[1]) for m in found), sum(int(m[2]) for m in found)

    def total(self) -> int:
        return sum(self.counts())


@pytest.fixture
def exact_rows(caplog) -> ExactRows:
    return ExactRows(caplog)


def save_pt(path: Path, train, test, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"logits": test, "logits_train": train, **extra}, path)
    return path


def save_labels(path: Path, ens: Ensemble) -> Path:
    np.savez(path, labels_train=ens.labels_train.numpy(), labels_test=ens.labels_test.numpy())
    return path


SEAMS = Path(__file__).resolve().parent / "seams"


def seam_env(**delays: float) -> dict:
    """The environment for a program started by a test, slowed where `delays` say
    (write_delay=, tile_delay=: seconds; see tests/seams/sitecustomize.py)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SEAMS), env.get("PYTHONPATH")]))
    for name, seconds in delays.items():
        env[f"ENSEMBLE_KERNEL_TEST_{name.upper()}"] = str(seconds)
    return env


def run_cli(*args) -> tuple[int, str, str]:
    """Run the program in-process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from ensemble_kernel.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _keep_the_real_probe():
    from ensemble_kernel.core import _precision as precision

    return precision.measure_rates


REAL_MEASURE_RATES = _keep_the_real_probe()  # before any test replaces it


def _py2_pickle(obj) -> bytes:
    """`obj` pickled as Python 2's cPickle wrote the published batches: protocol 2, bytes
    as BINSTRING opcodes (Python 3 would name the global _codecs.encode instead)."""
    import io
    import pickle
    import struct

    class Py2(pickle._Pickler):
        dispatch = dict(pickle._Pickler.dispatch)

        def save_bytes(self, data):
            if len(data) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
            else:
                self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
            self.memoize(data)

        dispatch[bytes] = save_bytes

    buffer = io.BytesIO()
    Py2(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_fake_cifar(root: Path, n_per_batch: int = 7, seed: int = 0,
                     py2: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A miniature CIFAR-10 python tree under root/cifar-10-batches-py: five training
    batches and a test batch of `n_per_batch` examples each, written as the real ones are
    (Python 2 protocol-2 pickles of dicts with str keys, a NumPy uint8 `data` array and a
    list of `labels`); `py2=False` pickles them with Python 3 (a re-pickled copy).

    Returns (labels_train, labels_test), the labels in torchvision's order.
    """
    import pickle

    dump = _py2_pickle if py2 else (lambda obj: pickle.dumps(obj, protocol=2))
    g = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in g.integers(0, 10, n_per_batch)]
        entry = {"batch_label": f"{name} of 6", "labels": labels,
                 "data": g.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"img_{name}_{i}.png" for i in range(n_per_batch)]}
        (folder / name).write_bytes(dump(entry))
        out.append(labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    (folder / "batches.meta").write_bytes(dump({"label_names": names,
                                                "num_cases_per_batch": n_per_batch}))
    return np.concatenate(out[:5]).astype(np.int64), np.asarray(out[5], dtype=np.int64)


# Two training scripts of the miniature published tree.
CODE_A = "# airbench, config A\nlr = 0.2\n"
CODE_B = "# airbench, config B\nlr = 0.4\n"


def make_published_tree(root: Path, labels_train, labels_test, *, n_files: int = 5,
                        n_classes: int = 10, codes=(CODE_A, CODE_B), seed: int = 0,
                        train: bool = True) -> list[Path]:
    """The published layout in miniature: root/<uuid>/log.pt, one run each, with `logits`,
    `logits_train`, `logits_tta`, `code` (cycling through `codes`) and `accs` (a tensor),
    float16 as published; logits carry the class structure of the given labels.
    `train=False` leaves out `logits_train` (the test-only published set).

    Files are named by seeded uuids, so their lexicographic order is not their creation
    order. Returns the files in creation order.
    """
    import uuid

    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(n_classes, n_classes, generator=g) * 3

    def runs(labels):
        labels = torch.as_tensor(np.asarray(labels))
        example = prototypes[labels] + torch.randn(len(labels), n_classes, generator=g)
        return example[None] + torch.randn(n_files, len(labels), n_classes, generator=g)

    train_runs, test_runs = runs(labels_train), runs(labels_test)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_files):
        name = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        obj = {"logits": test_runs[i].half(),
               "logits_tta": (test_runs[i] + 0.3 * torch.randn(test_runs[i].shape,
                                                               generator=g)).half(),
               "code": codes[i % len(codes)],
               "accs": torch.tensor([0.5 + 0.01 * i, 0.9])}
        if train:
            obj["logits_train"] = train_runs[i].half()
        path = root / name / "log.pt"
        path.parent.mkdir(parents=True)
        torch.save(obj, path)
        paths.append(path)
    return paths


def adversarial_pass(best: torch.Tensor, share: float, runner_up: torch.Tensor | None = None):
    """A replacement for `_Engine.accumulate_tile` whose bfloat16 pass errs by `share` of
    the engine's own bound where it hurts most: each query's true best neighbour pushed
    down by it (and `runner_up`, if given, pushed up); every other value exact.

    The real bfloat16 pass runs first, so the engine measures its rounding as it always
    does; the bound is then the one the engine will use (`_Engine.error_bound`), with its
    value term at the pushed pairs' own values (the engine's is at the largest value of
    each query's list, which holds them). One tile only: the queries and all references
    are measured once it has run.
    """
    from ensemble_kernel.core import _engine as engine_module

    original = engine_module._Engine.accumulate_tile

    def adversarial(self, tile, *, rows, dtype, **kw):
        if dtype == torch.float32:
            return original(self, tile, rows=rows, dtype=dtype, **kw)
        assert (tile.start, tile.stop) == (0, self.references.n_examples), "one tile"
        assert rows is None  # (a low-precision pass always takes every query)
        original(self, tile, rows=rows, dtype=dtype, **kw)  # measures the rounding
        block = original(self, tile, rows=rows, dtype=torch.float32, **kw)
        everything = slice(0, self.n_models)
        fa = self._features(self.queries, self.stats_q, everything,
                            slice(0, self.queries.n_examples), torch.float32)
        fb = self._features(self.references, self.stats_r, everything, tile, torch.float32)
        queries = torch.linalg.vector_norm(fa, dim=1).double()
        reference = float(torch.linalg.vector_norm(fb, dim=1).max())
        pushed = block.gather(1, best[:, None])[:, 0].abs()
        if runner_up is not None:
            pushed = torch.maximum(pushed, block.gather(1, runner_up[:, None])[:, 0].abs())
        # (0.99: the value term at the computed value, which the push moves by < 1% here)
        self._rounding.complete = True  # every row measured: one tile
        try:
            bound = self.error_bound(queries, reference, 0.99 * pushed.double())
        finally:
            self._rounding.complete = False
        eps = (share * bound).float()
        here = torch.arange(tile.start, tile.stop)[None, :]
        block = block - (here == best[:, None]) * eps[:, None]
        if runner_up is not None:
            block = block + (here == runner_up[:, None]) * eps[:, None]
        return block

    return adversarial


# Tests of a second or more on 2 cores (pytest --durations), parametrized cases as one:
# `make test-fast` leaves them out with the tests marked slow where they are defined.
_SLOW = {
    "test_ablations.py::test_a_budget_too_small_for_the_pass_computes_one_kernel_at_a_time",
    "test_ablations.py::test_the_kernels_outside_the_pass_run_exact_where_exact_was_asked",
    "test_api.py::test_no_top_level_name_is_shadowed_by_a_module_in_a_fresh_process",
    "test_benchmarks.py::test_bench_20k_end_to_end_at_tiny_scale",
    "test_benchmarks.py::test_gpu_profile_refuses_bad_options_in_one_line_before_any_work",
    "test_benchmarks.py::test_micro_refuses_bad_input_in_one_line",
    "test_benchmarks.py::test_report_bench_refuses_a_compare_src_without_the_package_before_any_work",
    "test_benchmarks.py::test_report_bench_times_both_trees_alternated_at_tiny_scale",
    "test_benchmarks.py::test_run_end_to_end_at_tiny_scale_reports_stages_and_a_budget_with_a_unit",
    "test_benchmarks.py::test_run_refuses_a_bad_device_or_budget_before_any_work",
    "test_cli_errors.py::test_a_real_process_prints_one_plain_line",
    "test_demo.py::test_datasets_are_made_locally_and_leave_global_rng_alone",
    "test_demo.py::test_demo_end_to_end_small",
    "test_distributed.py::test_two_gloo_processes_match_one",
    "test_examples.py::test_the_quickstart_refuses_a_missing_source_in_one_line",
    "test_examples.py::test_the_quickstart_refuses_user_errors_after_opening_in_one_line",
    "test_examples.py::test_the_quickstart_runs_on_a_small_store",
    "test_explain.py::test_view_commands_write_files_and_refuse_bad_ranks",
    "test_label_issues.py::test_datalab_reads_the_exported_graph_and_probabilities",
    "test_layers.py::test_the_old_module_paths_are_aliases_of_the_new_ones",
    "test_memory.py::test_neighbors_stays_within_its_memory_budget",
    "test_memory.py::test_the_programs_allocator_reuses_small_blocks_and_returns_large_ones",
    "test_memory_budget.py::test_compare_with_large_features_stays_within_its_budget",
    "test_memory_budget.py::test_report_passes_the_budget_and_device_to_the_sweep",
    "test_memory_budget.py::test_sweep_peak_rss_stays_within_the_budget",
    "test_nothing_silent.py::test_a_lock_held_elsewhere_refuses_the_job_and_leaves_the_checkpoint",
    "test_nothing_silent.py::test_a_second_job_on_the_same_out_is_refused_while_the_first_runs",
    "test_nothing_silent.py::test_an_error_after_the_progress_bar_is_a_clean_last_line",
    "test_nothing_silent.py::test_ctrl_c_says_interrupted_and_exits_130",
    "test_report_browser.py::test_a_sampled_sweep_says_so_in_the_report_and_an_unsampled_one_does_not",
    "test_results.py::test_to_pandas_without_pandas_says_which_extra_to_install",
    "test_runfile_fuzz.py::test_mutated_run_file_gives_the_same_results_or_one_line",
    "test_shared_statistics.py::test_a_budget_the_sweep_takes_without_the_shared_pass_it_takes_with_it",
    "test_store.py::test_neighbors_resumes_after_sigkill_and_writes_the_same_result",
    "test_store.py::test_sigkill_mid_ingest_keeps_whole_files_and_reingest_completes",
    "test_store_concurrency.py::test_four_ingest_commands_creating_one_store_at_once",
    "test_store_concurrency.py::test_four_processes_appending_at_once_lose_nothing",
    "test_store_faults.py::test_a_crash_after_any_write_step_leaves_before_or_after",
    "test_store_integrity.py::test_every_reading_command_survives_a_sample_of_store_damage",
    "test_sweep.py::test_the_sweeps_statistics_do_not_import_scipy_stats",
    "test_vector_math.py::test_the_first_parallel_exp_after_import_is_accurate_in_every_fresh_process",
    "test_writes.py::test_demo_replaces_only_its_own_store",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if f"{item.path.name}::{item.originalname}" in _SLOW:
            item.add_marker(pytest.mark.slow)
