"""torchrun with two local gloo processes writes exactly what one process writes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ensemble_kernel.testing import dense_kernel

from conftest import assert_same_neighbors, make_ensemble, save_pt


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_two_gloo_processes_match_one(tmp_path, precision):
    ens = make_ensemble(n_models=6, n_train=1500, n_test=120)
    src = save_pt(tmp_path / "runs.pt", ens.train, ens.test)
    args = ["neighbors", str(src), "--k", "5", "--memory-budget", "8MiB",
            "--precision", precision, "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "ensemble_kernel", *args,
                          "--out", str(tmp_path / "one.npz")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", "-m", "ensemble_kernel", *args,
                          "--out", str(tmp_path / "two.npz")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["indices"], b["indices"])
        assert np.array_equal(a["values"], b["values"])
        assert json.loads(str(b["meta"]))["options"]["processes"] == 2
        assert_same_neighbors(b["indices"], b["values"], dense_kernel(ens.test, ens.train), 5)
    assert not (tmp_path / "two.npz.partial").exists()
