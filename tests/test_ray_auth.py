"""Studies on a Ray cluster with token authentication (Ray 2.52+): a simulated cluster
whose nodes and driver share a token runs a study; a driver with a wrong token, or
none, is refused with one line.

As in `test_ray.py`: loopback only, Ray's files under a temp folder, nothing left
running. ``HOME`` is a temp folder too and the token a temp file
(``RAY_AUTH_TOKEN_PATH``): nothing is written to ``$HOME``. Ray caches its
authentication mode and token in the process (a C++ config and token loader);
`_auth` reloads them after each change of the variables, as a new process would
read them.
"""
import csv
import secrets
import time

import pytest

from test_ray import config, ray, ray_here  # noqa: F401 (ray: loopback only, set before it is imported)
from ray._private.authentication_test_utils import reset_auth_token_state  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from qdistill import cli  # noqa: E402
from qdistill.training.rundir import RunDir  # noqa: E402

pytestmark = pytest.mark.slow
RUNS = ["q1-hard-T1-s0", "q2-soft-T4-s0"]
FIX = "RAY_AUTH_TOKEN_PATH to a file that holds the cluster's token"


def _auth(mp: pytest.MonkeyPatch, **env) -> None:
    """Set (a value) or unset (``None``) authentication variables; then Ray in this
    process reads them again."""
    for k, v in env.items():
        if v is None:
            mp.delenv(k, raising=False)
        else:
            mp.setenv(k, v)
    reset_auth_token_state()


@pytest.fixture(scope="module")
def token_cluster():
    """A head (no CPUs) and one worker node of 2 CPUs, started with ``RAY_AUTH_MODE=token``
    and the token in a temp file; the variables stay set for the tests (each test puts
    back what it changes)."""
    with ray_here(RAY_AUTH_MODE="token") as tmp, pytest.MonkeyPatch.context() as mp:
        (tmp / "home").mkdir()
        token = tmp / "token"
        token.write_text(secrets.token_hex(32) + "\n")
        _auth(mp, HOME=str(tmp / "home"), RAY_AUTH_TOKEN_PATH=str(token), RAY_AUTH_TOKEN=None)
        c = Cluster(initialize_head=True,  # no autoscaler monitor, no log monitor: nothing reads them here
                    head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                                    "no_monitor": True, "include_log_monitor": False})
        try:
            node = c.add_node(num_cpus=2, node_ip_address="127.0.0.1")
            yield c, node, tmp
        finally:
            c.shutdown()
            _auth(mp)
    reset_auth_token_state()  # the variables are back: so is Ray's view of them


def test_a_cluster_with_token_authentication_runs_a_study(token_cluster, tmp_path):
    """The driver has the nodes' token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH): the
    teacher and both runs train on the worker node, 2 epochs each."""
    c, node, tmp = token_cluster
    s = tmp_path / "S"
    assert cli.main(["study", str(config(tmp_path)), "--out", str(s), "--ray", c.address,
                     "--set", "train.epochs=2", "--quiet"]) == 0
    with open(s / "results.csv", newline="") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == RUNS and {row["status"] for row in rows.values()} == {"ok"}
    for name in RUNS:
        run = RunDir(s / "runs" / name)
        assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
        summary = run.read_summary()
        assert summary["node"].endswith("/" + node.node_id[:8])  # the head has no CPUs
        assert 0.0 <= summary["test_acc_at_val_best"] <= 1.0
    assert not (tmp / "home" / ".ray").exists()  # no token generated in $HOME


def _refused(case: str, address: str, tmp_path) -> tuple[dict, str, str]:
    """The variables of a driver the cluster at ``address`` refuses, the address it is
    given, and its line."""
    wrong = tmp_path / "wrong-token"
    wrong.write_text(secrets.token_hex(32))
    home = tmp_path / "home"  # `--ray auto` turns authentication on where ~/.ray/auth_token exists
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    missing = tmp_path / "no-token"
    return {
        "wrong token": ({"RAY_AUTH_TOKEN_PATH": str(wrong)}, address,
                        f"the Ray cluster at {address} refused the token in {wrong}: set {FIX}"),
        "no token": ({"RAY_AUTH_TOKEN_PATH": str(missing)}, address,
                     f"this driver has no token for the Ray cluster at {address} ({missing} holds none): set {FIX}"),
        "authentication off": ({"RAY_AUTH_MODE": "disabled"}, address,
                               f"the Ray cluster at {address} requires a token: set RAY_AUTH_MODE=token and {FIX}"),
        "auto, a wrong token in ~/.ray": (
            {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN_PATH": None, "HOME": str(home), "RAY_ADDRESS": address}, "auto",
            f"the Ray cluster at {address} refused the token in {home}/.ray/auth_token: set {FIX}"),
    }[case]


@pytest.mark.parametrize("case", ["wrong token", "no token", "authentication off", "auto, a wrong token in ~/.ray"])
def test_a_driver_without_the_clusters_token_exits_2_with_one_line_within_10_s(
        token_cluster, tmp_path, capfd, case):
    """Stderr, the file descriptor, holds the one line: without the check before
    ``ray.init``, 20 s and 20 lines of `gcs_client.cc ... Unauthenticated`."""
    c, _, _ = token_cluster
    env, address, line = _refused(case, c.address, tmp_path)
    with pytest.MonkeyPatch.context() as mp:  # puts back RAY_AUTH_MODE too, which `auto` sets
        _auth(mp, **env)
        t0 = time.monotonic()
        code = cli.main(["study", str(config(tmp_path)), "--out", str(tmp_path / "S"), "--ray", address])
        elapsed = time.monotonic() - t0
    reset_auth_token_state()
    out, err = capfd.readouterr()
    assert code == 2 and err == f"qdistill: error: {line}\n" and out == ""
    assert elapsed < 10, elapsed
    assert not (tmp_path / "S").exists()
