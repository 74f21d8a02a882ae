"""`neighbors` resumes only work done on the same content (issue 8, item 4).

A partial run is simulated in-process: the checkpoint's `save` stops the command after
its first tile, as a kill would. Between that and the resume, a source changes its
content but keeps its path, shape, size and modification time; the resumed result must
equal a fresh run on the new content, not reuse the stale tile.
"""

import json
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from ensemble_kernel.storage import _checkpoint as checkpoint_module
from ensemble_kernel.cli import app

from conftest import make_ensemble

runner = CliRunner()
ARGS = ["--k", "5", "--memory-budget", "6MiB", "-q"]


class _Killed(Exception):
    pass


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def _partial_run(monkeypatch, src, out, tiles=1, args=ARGS):
    """Run `neighbors` until `tiles` tiles are saved, then stop it as a kill would."""
    original = checkpoint_module.TileCheckpoint.save
    saved = []

    def save(self, index, found):
        original(self, index, found)
        saved.append(index)
        if len(saved) >= tiles:
            raise _Killed()

    with monkeypatch.context() as m:
        m.setattr(checkpoint_module.TileCheckpoint, "save", save)
        result = _run("neighbors", *src, "--out", out, *args)
    assert isinstance(result.exception, _Killed), result.output
    partial = out.with_name(out.name + ".partial")
    assert len(list(partial.glob("tile-*.npz"))) == tiles
    return partial


def _result(path):
    with np.load(path) as f:
        return f["indices"], f["values"]


def _fresh(tmp_path, src, name="fresh.npz"):
    out = tmp_path / name
    result = _run("neighbors", *src, "--out", out, "--no-resume", *ARGS)
    assert result.exit_code == 0, result.output
    return _result(out)


def _save_npz(path, ens):
    np.savez(path, logits_train=ens.train.numpy(), logits_test=ens.test.numpy())


def _same(a, b):
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.fixture
def two():
    """Two ensembles of the same shape whose neighbours differ."""
    return (make_ensemble(seed=1, n_models=6, n_train=2000, n_test=200),
            make_ensemble(seed=2, n_models=6, n_train=2000, n_test=200))


def test_a_changed_run_file_is_not_resumed(tmp_path, monkeypatch, two):
    old, new = two
    src = tmp_path / "runs.npz"
    _save_npz(src, old)
    out = tmp_path / "nn.npz"
    _partial_run(monkeypatch, [src], out)
    # Same path, same shape, same size, same modification time; other content.
    stat = src.stat()
    _save_npz(src, new)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size
    result = _run("neighbors", src, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    fresh = _fresh(tmp_path, [src])
    _save_npz(tmp_path / "old.npz", old)
    stale = _fresh(tmp_path, [tmp_path / "old.npz"], "stale.npz")
    assert not _same(fresh, stale)  # the test can tell them apart
    assert _same(_result(out), fresh)
    assert not out.with_name("nn.npz.partial").exists()


def test_an_unchanged_run_file_is_resumed(tmp_path, monkeypatch, two):
    src = tmp_path / "runs.npz"
    _save_npz(src, two[0])
    out = tmp_path / "nn.npz"
    partial = _partial_run(monkeypatch, [src], out, tiles=2)
    manifest = json.loads((partial / "manifest.json").read_text())
    assert "sha256" in json.dumps(manifest)
    result = _run("neighbors", src, "--out", out, *ARGS)
    assert result.exit_code == 0
    assert "resuming: 2 tiles" in result.stderr
    assert _same(_result(out), _fresh(tmp_path, [src]))


def _store(tmp_path, ens, name):
    path = tmp_path / name
    if path.exists():
        shutil.rmtree(path)
    files = tmp_path / f"{name}-src.npz"
    _save_npz(files, ens)
    result = _run("ingest", files, "--store", path, "-q")
    assert result.exit_code == 0, result.output
    return path


def test_a_store_with_the_same_run_count_but_other_runs_is_not_resumed(tmp_path, monkeypatch,
                                                                        two):
    old, new = two
    store = _store(tmp_path, old, "store")
    out = tmp_path / "nn.npz"
    _partial_run(monkeypatch, [store], out)
    store = _store(tmp_path, new, "store")  # same path, same run count, other runs
    result = _run("neighbors", store, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    fresh = _fresh(tmp_path, [store])
    stale = _fresh(tmp_path, [_store(tmp_path, old, "old-store")], "stale.npz")
    assert not _same(fresh, stale)
    assert _same(_result(out), fresh)


def test_options_that_change_the_result_restart(tmp_path, monkeypatch, two):
    src = tmp_path / "runs.npz"
    _save_npz(src, two[0])
    out = tmp_path / "nn.npz"
    _partial_run(monkeypatch, [src], out)
    result = _run("neighbors", src, "--out", out, "--no-log-softmax", *ARGS)
    assert result.exit_code == 0
    assert "resuming:" not in result.stderr
    assert "it differs in options.log_softmax; starting over" in \
        " ".join(result.stderr.split())  # says why the tiles go
    fresh = tmp_path / "fresh.npz"
    assert _run("neighbors", src, "--out", fresh, "--no-log-softmax", "--no-resume",
                *ARGS).exit_code == 0
    assert _same(_result(out), _result(fresh))


def test_a_damaged_tile_is_recomputed(tmp_path, monkeypatch, two):
    src = tmp_path / "runs.npz"
    _save_npz(src, two[0])
    out = tmp_path / "nn.npz"
    partial = _partial_run(monkeypatch, [src], out, tiles=2)
    tile = sorted(partial.glob("tile-*.npz"))[0]
    tile.write_bytes(tile.read_bytes()[:100])  # truncated
    result = _run("neighbors", src, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    assert _same(_result(out), _fresh(tmp_path, [src]))


def test_stray_files_in_the_checkpoint_are_ignored(tmp_path, monkeypatch, two):
    # A file manager's copy or a stray file named like a tile is skipped, not a traceback.
    src = tmp_path / "runs.npz"
    _save_npz(src, two[0])
    out = tmp_path / "nn.npz"
    partial = _partial_run(monkeypatch, [src], out, tiles=2)
    (partial / "tile-abc.npz").write_text("x")
    shutil.copy(partial / "tile-00000.npz", partial / "tile-00000 (copy).npz")
    result = _run("neighbors", src, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    assert "resuming: 2 tiles" in result.stderr
    assert _same(_result(out), _fresh(tmp_path, [src]))


def test_a_kill_while_starting_afresh_leaves_a_folder_neighbors_still_owns(tmp_path,
                                                                          monkeypatch, two):
    # Starting over removes the old tiles but replaces the manifest in place: killed just
    # before the new manifest is written, the folder is still recognised as neighbors'
    # (it used to be left without a manifest, and refused forever after).
    src = tmp_path / "runs.npz"
    _save_npz(src, two[0])
    out = tmp_path / "nn.npz"
    partial = _partial_run(monkeypatch, [src], out, tiles=2)

    def killed(*args, **kwargs):
        raise _Killed()

    checkpoint = checkpoint_module.TileCheckpoint(out, {"other": "inputs"})
    with monkeypatch.context() as m:
        m.setattr(checkpoint_module, "atomic_write_text", killed)
        with pytest.raises(_Killed):
            checkpoint.start({"tile_size": 7, "chunk_models": 1})
    assert not list(partial.glob("tile-*.npz"))
    checkpoint_module.TileCheckpoint(out, {}).check_owner()  # still ours
    result = _run("neighbors", src, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    assert _same(_result(out), _fresh(tmp_path, [src]))


@pytest.mark.parametrize("first,then", [
    ([], ["--test-key", "logits_tta"]),  # same files, another test split
    (["--test-key", "logits_tta"], []),
])
def test_another_test_key_restarts(tmp_path, monkeypatch, two, first, then):
    """The files' hashes are the same; the test split is not: no stale tile is reused."""
    ens = two[0]
    src = tmp_path / "runs.pt"
    import torch
    torch.save({"logits": ens.test, "logits_train": ens.train,
                "logits_tta": ens.test.flip(1)}, src)
    out = tmp_path / "nn.npz"
    _partial_run(monkeypatch, [src, *first], out)
    result = _run("neighbors", src, "--out", out, *then, *ARGS)
    assert result.exit_code == 0, result.output
    assert "resuming:" not in result.stderr
    fresh = tmp_path / "fresh.npz"
    assert _run("neighbors", src, "--out", fresh, "--no-resume", *then, *ARGS).exit_code == 0
    assert _same(_result(out), _result(fresh))
    meta = json.loads(str(np.load(out)["meta"]))
    assert meta["options"].get("test_key") == (then[1] if then else None)


@pytest.mark.parametrize("dtype, item", [(np.float64, 8), (np.float16, 2)])
def test_the_checkpoints_tiles_are_planned_for_the_logits_as_stored(tmp_path, monkeypatch,
                                                                     dtype, item):
    # The tiles the checkpoint fixes are then forced on the engine: planned for 4 bytes a
    # logit, float64 logits took up to 1.6 x the budget (a reviewer's finding).
    from ensemble_kernel.cli import compute

    ens = make_ensemble(seed=1, n_models=6, n_train=2000, n_test=200)
    src = tmp_path / "runs.npz"
    np.savez(src, logits_train=ens.train.numpy().astype(dtype),
             logits_test=ens.test.numpy().astype(dtype))
    seen, real = [], compute.plan_memory
    monkeypatch.setattr(compute, "plan_memory",
                        lambda *a, **k: seen.append(k["raw_bytes"]) or real(*a, **k))
    result = _run("neighbors", src, "--out", tmp_path / "n.npz", *ARGS)
    assert result.exit_code == 0, result.output
    assert seen == [item]


def test_a_resume_under_a_smaller_budget_starts_over_within_it(tmp_path, monkeypatch, two):
    """A job killed for memory is rerun with less: the tiles kept were planned for the
    larger budget, and resuming them would exceed the new one. The command says so,
    starts over with a plan of its own, and gives the fresh run's neighbours."""
    import ensemble_kernel.cli.compute as compute

    src = tmp_path / "runs.npz"
    _save_npz(src, two[0])
    out = tmp_path / "nn.npz"
    large = ["--k", "5", "--memory-budget", "8MiB", "-q"]
    partial = _partial_run(monkeypatch, [src], out, tiles=2, args=large)
    kept = json.loads((partial / "manifest.json").read_text())["plan"]
    plans = []
    real = compute._top_k_neighbors
    monkeypatch.setattr(compute, "_top_k_neighbors", lambda *a, **k: plans.append(
        (k["tile_size"], k["chunk_models"], k["memory_budget"])) or real(*a, **k))
    small = ARGS  # 6 MiB
    result = _run("neighbors", src, "--out", out, *small)
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "not resuming from" in said and "(tiles of 500 references, blocks of 6 runs, exact " \
        "mode) does not fit a memory budget of 6.0 MiB; starting over" in said
    assert "resuming: 2" not in said
    (tile, models, budget), = plans
    assert (tile, models) != (kept["tile_size"], kept["chunk_models"])
    assert budget == 6 << 20
    assert _same(_result(out), _fresh(tmp_path, [src]))
    # A larger budget still resumes the kept tiles (their plan fits it).
    partial = _partial_run(monkeypatch, [src], out, tiles=1)
    result = _run("neighbors", src, "--out", out, "--k", "5", "--memory-budget", "64MiB", "-q")
    assert result.exit_code == 0 and "resuming: 1 tiles" in result.stderr
    (indices, values), (fresh_indices, fresh_values) = _result(out), _fresh(tmp_path, [src])
    assert np.array_equal(indices, fresh_indices)  # values: float32 rounding (other pieces)
    np.testing.assert_allclose(values, fresh_values, rtol=1e-6, atol=1e-7)


def test_a_plan_forced_beyond_the_budget_is_refused():
    """`plan_memory` with a kept tile and block (a checkpoint's) checks they fit, as the
    plan it chooses does; the same plan within a budget large enough is taken as given."""
    from ensemble_kernel.errors import BudgetError
    from ensemble_kernel.core._plan import plan_memory

    shape = dict(n_queries=200, n_references=2000, n_models=6, n_used_classes=5, k_keep=5)
    big = plan_memory(**shape, budget=8 << 20)
    kept = dict(tile_size=big.tile_size, chunk_models=big.chunk_models)
    assert (big.tile_size, big.chunk_models) == (500, 6)
    assert plan_memory(**shape, budget=8 << 20, **kept).chunk_models == 6
    with pytest.raises(BudgetError, match=r"7.8 MiB is too small for tiles of 500 references "
                                          r"with blocks of 6 runs .*; at least 7.9 MiB is"):
        plan_memory(**shape, budget=int(7.8 * 2**20), **kept)
    plan_memory(**shape, budget=int(7.9 * 2**20), **kept)  # the least it names fits
    with pytest.raises(BudgetError, match=r"6.0 MiB is too small for tiles of 500 .* at least "
                                          r"7.9 MiB"):
        plan_memory(**shape, budget=6 << 20, **kept)  # not even one run beside those tiles
    small = plan_memory(**shape, budget=6 << 20)
    assert plan_memory(**shape, budget=6 << 20, tile_size=small.tile_size,
                       chunk_models=small.chunk_models).tile_size == small.tile_size


@pytest.mark.parametrize("resume", [[], ["--no-resume"]])
def test_the_default_budget_is_read_once_for_the_plan_and_the_engine(tmp_path, monkeypatch,
                                                                      resume):
    """Without --memory-budget the default follows free memory, which moves: the plan made
    for one reading must not be checked by the engine against a smaller second one (the
    plan is tight, so a fall of 256 KiB refused it)."""
    import ensemble_kernel.cli.compute as compute
    import ensemble_kernel.core._engine as engine

    readings = []

    def falling(device="cpu"):  # free memory falls a little between two readings
        readings.append(1)
        return 6427613 - 262144 * (len(readings) - 1)

    import ensemble_kernel.core._precision as precision

    for module in (compute, engine, precision):
        monkeypatch.setattr(module, "default_memory_budget", falling)
    rng = np.random.default_rng(0)
    src = tmp_path / "runs.npz"
    np.savez(src, logits_train=rng.normal(size=(8, 500, 5)).astype("float32"),
             logits_test=rng.normal(size=(8, 50, 5)).astype("float32"))
    for mode in ("exact", "auto"):  # auto chooses for the same reading
        readings.clear()
        result = _run("neighbors", src, "--out", tmp_path / f"{mode}.npz", "--k", "5",
                      "--precision", mode, "-q", *resume)
        assert result.exit_code == 0, result.output
        assert len(readings) == 1


def test_a_resume_under_a_budget_too_small_for_any_plan_is_refused_and_keeps_the_tiles(
        tmp_path, monkeypatch, two):
    src = tmp_path / "runs.npz"
    _save_npz(src, two[0])
    out = tmp_path / "nn.npz"
    partial = _partial_run(monkeypatch, [src], out, tiles=2,
                           args=["--k", "5", "--memory-budget", "8MiB", "-q"])
    before = {f.name: f.read_bytes() for f in partial.iterdir()}
    result = _run("neighbors", src, "--out", out, "--k", "5", "--memory-budget", "4MiB", "-q")
    assert result.exit_code == 2
    assert "too small" in result.stderr and "not resuming" not in result.stderr
    assert {f.name: f.read_bytes() for f in partial.iterdir()} == before
    # The same with another k: the refusal comes before any word on the checkpoint.
    result = _run("neighbors", src, "--out", out, "--k", "4", "--memory-budget", "4MiB", "-q")
    assert result.exit_code == 2 and "starting over" not in result.stderr
    assert {f.name: f.read_bytes() for f in partial.iterdir()} == before


def test_auto_resumes_tiles_computed_in_the_other_precision(tmp_path, monkeypatch, two):
    """Auto's choice depends on the budget and the machine's probe, and may differ on the
    rerun: the tiles kept are then resumed in the precision they were computed in (every
    precision gives the same neighbours), not thrown away. A precision asked for by name
    is what runs: it starts over."""
    import dataclasses

    import ensemble_kernel.cli.compute as compute

    chosen = []
    real = compute.resolve_precision

    def choose(*a, **kw):
        choice = real(*a, **kw)
        return dataclasses.replace(choice, precision=chosen.pop(0)) if kw and \
            a[0] == "auto" else choice

    monkeypatch.setattr(compute, "resolve_precision", choose)
    src = tmp_path / "runs.npz"
    _save_npz(src, two[0])
    out = tmp_path / "nn.npz"
    auto = ["--k", "5", "--memory-budget", "8MiB", "--precision", "auto", "-q"]
    chosen.append("fast")
    partial = _partial_run(monkeypatch, [src], out, tiles=1, args=auto)
    chosen.append("exact")  # this time auto would run exact mode
    result = _run("neighbors", src, "--out", out, *auto)
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "auto chose exact mode, but the tiles in" in said and "computed in fast mode: " \
        "resuming them" in said and "resuming: 1 tiles" in said
    with np.load(out) as f:
        meta = json.loads(str(f["meta"]))
    assert meta["precision"]["chosen"] == "fast" and "resumed" in meta["precision"]["reason"]
    indices, values = _result(out)
    fresh = tmp_path / "fresh.npz"
    assert _run("neighbors", src, "--out", fresh, "--no-resume", "--k", "5", "--memory-budget",
                "8MiB", "--precision", "exact", "-q").exit_code == 0
    assert np.array_equal(indices, _result(fresh)[0])
    np.testing.assert_allclose(values, _result(fresh)[1], rtol=1e-6, atol=1e-7)
    # Under auto, the precision is not what differs: the plan's budget or the inputs are.
    chosen.append("fast")
    partial = _partial_run(monkeypatch, [src], out, tiles=1, args=auto)
    chosen.append("exact")
    small = ["--k", "5", "--memory-budget", "6MiB", "--precision", "auto", "-q"]
    result = _run("neighbors", src, "--out", out, *small)
    said = " ".join(result.stderr.split())
    assert result.exit_code == 0 and "resuming:" not in said
    assert "blocks of 6 runs, fast mode) does not fit a memory budget of 6.0 MiB; starting " \
        "over" in said
    chosen.append("fast")
    partial = _partial_run(monkeypatch, [src], out, tiles=1, args=auto)
    chosen.append("exact")
    result = _run("neighbors", src, "--out", out, *auto[:1], "4", *auto[2:])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 0 and "it differs in options.k; starting over" in said
    # Asked for by name, exact mode does not take fast mode's tiles: it starts over.
    chosen.append("fast")
    partial = _partial_run(monkeypatch, [src], out, tiles=1, args=auto)
    result = _run("neighbors", src, "--out", out, "--k", "5", "--memory-budget", "8MiB",
                  "--precision", "exact", "-q")
    assert result.exit_code == 0 and "resuming:" not in result.stderr
    assert "it differs in options.precision; starting over" in " ".join(result.stderr.split())
    assert not partial.exists() and _same(_result(out), _result(fresh))


def test_a_tile_cut_by_another_plan_is_computed_again(tmp_path, monkeypatch, two, caplog):
    """Each tile file carries the plan it was cut by: a manifest whose plan was changed
    (here by hand: tiles twice as wide) does not take tile 0 of 500 references for a tile
    of 1,000. Tiles written without a plan (an earlier version) are computed again too."""
    src = tmp_path / "runs.npz"
    _save_npz(src, two[0])
    out = tmp_path / "nn.npz"
    args = ["--k", "5", "--memory-budget", "8MiB", "-q"]
    partial = _partial_run(monkeypatch, [src], out, tiles=1, args=args)
    manifest = json.loads((partial / "manifest.json").read_text())
    assert manifest["plan"]["tile_size"] == 500
    manifest["plan"]["tile_size"] = 1000
    (partial / "manifest.json").write_text(json.dumps(manifest))
    wide = ["--k", "5", "--memory-budget", "64MiB", "-q"]
    result = _run("neighbors", src, "--out", out, *wide)
    assert result.exit_code == 0, result.output
    assert "resuming: 0 tiles" in " ".join(result.stderr.split())
    fresh = _fresh(tmp_path, [src])
    assert np.array_equal(_result(out)[0], fresh[0])
    # A tile without the plan in it
    partial = _partial_run(monkeypatch, [src], out, tiles=1, args=args)
    tile = next(partial.glob("tile-*.npz"))
    with np.load(tile) as f:
        np.savez(tile, indices=f["indices"], values=f["values"])
    caplog.clear()
    result = _run("neighbors", src, "--out", out, *args)
    said = " ".join(result.stderr.split())
    assert result.exit_code == 0 and "resuming: 0 tiles" in said, said
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(logged) == 1 and logged[0].startswith("computing 1 tiles in")  # one line
    assert np.array_equal(_result(out)[0], fresh[0])
