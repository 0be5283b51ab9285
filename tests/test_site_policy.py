"""What a site decides for itself, checked without a federation: run ids from messages
become fixed-format keys (never paths), site and run names are names, the worker's SecAgg+
checks refuse setups below the site's minimum and unmask requests that would reveal one
site's update, a reply carries only the named scalars the site releases, and the site
commands refuse bad flags in one line. The deployed attacks are in test_hostile_app.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from fedtune.client.secagg_guard import SecAggRefused, check_stage_request
from fedtune.client.site_policy import SitePolicy, check_site_name, run_key
from fedtune.client.worker_messages import released_metrics
from fedtune.config import RunSettings
from fedtune.errors import ConfigError, FedtuneError
from fedtune.flower_env import child_env

FEDTUNE = str(Path(sys.executable).parent / "fedtune")
REPO = Path(__file__).resolve().parent.parent


def test_a_run_id_from_a_message_becomes_a_fixed_format_key() -> None:
    for hostile in ("../../../../etc/x", "/abs/path", "a/b", "..", "", "x" * 10000, "run\x00id"):
        key = run_key(hostile)
        assert re.fullmatch(r"[a-z0-9-]{1,40}-[0-9a-f]{16}", key), key
        assert "/" not in key and ".." not in key
    assert run_key("deployed-1a2b") == run_key("deployed-1a2b") != run_key("deployed-1a2c")  # stable across resumes


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a b"])
def test_a_site_name_is_a_name(name: str) -> None:
    with pytest.raises(FedtuneError, match="site name"):
        check_site_name(name)


@pytest.mark.parametrize("name", ["../../escape", "/abs", "a/b", ".x", "x" * 129])
def test_a_run_name_that_is_not_a_folder_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="run-name"):
        RunSettings.from_run_config({"run-name": name})


def test_non_finite_numbers_in_the_run_config_are_refused() -> None:
    with pytest.raises(ConfigError, match="dp-target-epsilon.*finite"):
        RunSettings.from_run_config({"dp-target-epsilon": float("nan")})


def test_a_site_policy_needs_at_least_two_sites_per_secagg_sum(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match="--min-secagg-sites must be at least 2"):
        SitePolicy("bank-a", tmp_path / "d.jsonl", tmp_path, min_secagg_sites=1)


def setup(
    sample: int = 3,
    shares: int = 3,
    threshold: int = 2,
    clip: float = 4.0,
    target: int = 1 << 22,
    modulus: int = 1 << 32,
) -> ConfigRecord:
    return ConfigRecord(
        {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: sample,
            Key.SHARE_NUMBER: shares,
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: clip,
            Key.TARGET_RANGE: target,
            Key.MOD_RANGE: modulus,
            Key.MAX_WEIGHT: 100.0,
        }
    )


def test_secagg_setups_below_the_sites_minimum_are_refused() -> None:
    check_stage_request(setup(), None, 2, "bank-a")  # an honest setup passes
    refusals = {
        "reconstruction threshold of 1": setup(sample=1, shares=1, threshold=1),
        "reconstruction threshold of 2": setup(threshold=2),  # for a site that asks for 3
        "threshold <= shares <= sites": setup(sample=2, shares=3, threshold=2),
        "clipping range": setup(clip=float("inf")),
        "modulus": setup(modulus=1 << 40),
    }
    for reason, record in refusals.items():
        with pytest.raises(SecAggRefused, match=reason):
            check_stage_request(record, None, 3 if "of 2" in reason else 2, "bank-a")


def test_an_unmask_request_that_would_reveal_one_site_is_refused() -> None:
    state = ConfigRecord({"public_keys_dict:K": [1, 2, 3], "public_keys_dict:V": [b"a", b"b", b"c", b"d", b"e", b"f"]})

    def unmask(active: list[int], dead: list[int]) -> ConfigRecord:
        return ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})

    check_stage_request(unmask([1, 2], [3]), state, 2, "bank-a")  # a dropout, told honestly
    with pytest.raises(SecAggRefused, match="both active and dropped"):
        check_stage_request(unmask([1, 2, 3], [3]), state, 2, "bank-a")  # both shares of node 3: its update
    with pytest.raises(SecAggRefused, match="both active and dropped, or twice"):
        check_stage_request(unmask([1, 1], []), state, 2, "bank-a")
    with pytest.raises(SecAggRefused, match="never exchanged keys"):
        check_stage_request(unmask([1, 2], [9]), state, 2, "bank-a")


def test_a_reply_carries_only_the_named_scalars_the_site_releases() -> None:
    out = released_metrics(
        {
            "site": "forged",
            "train_loss": 0.5,
            "val_accuracy": 0.9,
            "dp_epsilon": 1.0,
            "raw": b"data",
            "loot": "text",
            "val_note": "text",
            "steps": float("nan"),
        },
        "bank-a",
    )
    assert out == {"site": "bank-a", "train_loss": 0.5, "val_accuracy": 0.9, "dp_epsilon": 1.0}


def fedtune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDTUNE, *args], capture_output=True, text=True, env=child_env(), timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["deploy", "site", "--superlink", "coordinator", "--ca", "x", "--key", "y", "--data", "z"],
            "--superlink coordinator: expected HOST:PORT",
        ),
        (
            ["deploy", "site", "--superlink", "h:1", "--ca", "x", "--key", "y", "--data", "z", "--max-delta", "5"],
            "--max-delta is a probability: it must be < 1, got 5.0",
        ),
        (
            ["deploy", "site", "--superlink", "h:1", "--ca", "x", "--key", "y", "--data", "z", "--allow-app", "abc"],
            "--allow-app abc: expected an app's SHA-256",
        ),
        (["deploy", "worker", "--socket", "/tmp/w.sock"], "a site's worker needs --data"),
        (
            [
                "registry",
                "serve",
                "--address",
                "127.0.0.1",
                "--store",
                "s",
                "--cert",
                "c",
                "--key",
                "k",
                "--token-file",
                "t",
                "--trust-key",
                "p",
            ],
            "--address 127.0.0.1: expected HOST:PORT",
        ),
    ],
)
def test_bad_site_flags_are_one_line(args: list[str], message: str) -> None:
    out = fedtune(*args)
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bad_peer_flags_are_one_line_before_the_worker_serves(tmp_path: Path) -> None:
    from fedtune.client.deployment import site_keypair

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    private, public = site_keypair(tmp_path / "keys", "bank-a")
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "bank-a.pub").write_bytes(public.read_bytes())
    worker = ["deploy", "worker", "--socket", str(tmp_path / "w.sock"), "--data", str(data)]
    for extra, message in (
        (["--peers", str(tmp_path / "peers")], "--peers needs --identity-key"),
        (["--peers", str(tmp_path / "nowhere"), "--identity-key", str(private)], "nowhere: not a folder"),
        (["--peers", str(tmp_path / "peers"), "--identity-key", str(public)], "not an unencrypted OpenSSH private key"),
        (["--max-colluders", "1"], "--max-colluders applies to signed SecAgg+"),
    ):
        out = fedtune(*worker, *extra)
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_deploy_init_twice_refuses_to_replace_the_keys_sites_trust(tmp_path: Path) -> None:
    assert fedtune("deploy", "init", "--dir", str(tmp_path), "--host", "127.0.0.1").returncode == 0
    key = (tmp_path / "pki" / "superlink.key").read_bytes()
    again = fedtune("deploy", "init", "--dir", str(tmp_path), "--host", "127.0.0.1")
    assert again.returncode == 1 and "refusing to replace them" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "pki" / "superlink.key").read_bytes() == key


def test_deploy_run_without_a_registered_connection_is_one_line(tmp_path: Path) -> None:
    out = fedtune("deploy", "run", "--dir", str(tmp_path), "--app", str(REPO))
    assert out.returncode == 1 and "no flwr-home/config.toml" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_the_app_hash_is_what_flwr_run_ships_and_stable() -> None:
    first, second = fedtune("deploy", "app-hash", "--app", str(REPO)), fedtune("deploy", "app-hash", "--app", str(REPO))
    assert (
        first.returncode == 0 and re.fullmatch(r"sha256:[0-9a-f]{64}\n", first.stdout) and first.stdout == second.stdout
    )


def test_a_port_in_use_is_one_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        out = fedtune("deploy", "site", "--superlink", "h:1", "--ca", "x", "--key", "y", "--data", "z", "--port", port)
    assert out.returncode == 1 and f"--port {port}: in use on this machine" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_run() -> None:
    from fedtune.server.preflight import check_run_folder

    with pytest.raises(FedtuneError, match="output-dir /proc/fedtune-nope: cannot write there"):
        check_run_folder(RunSettings.from_run_config({"output-dir": "/proc/fedtune-nope", "run-name": "r"}))


def test_the_site_decides_its_own_validation_split(tmp_path: Path) -> None:
    run = RunSettings.from_run_config({"val-fraction": 0.9})
    assert SitePolicy("bank-a", tmp_path / "d.jsonl", tmp_path).run_settings(run).val_fraction == 0.9
    assert SitePolicy("bank-a", tmp_path / "d.jsonl", tmp_path, val_fraction=0.1).run_settings(run).val_fraction == 0.1
    with pytest.raises(FedtuneError, match="--val-fraction must be in"):
        SitePolicy("bank-a", tmp_path / "d.jsonl", tmp_path, val_fraction=1.5)
