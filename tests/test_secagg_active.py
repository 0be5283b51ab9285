"""Signed SecAgg+ against a coordinator that cheats (`tests/support/hostile_secagg.py`
drives sites running the site's own SecAgg+ code). Each attack of Bonawitz et al. / Bell et
al. is run twice: against plain SecAgg+, where the coordinator recovers the target site's
update, and against sites holding their peers' keys (`--peers`), which refuse before any
share that would unmask a site leaves them. Then the honest path in a real Flower
simulation: the signed protocol gives the same aggregate as plain SecAgg+."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Message
from support.hostile_secagg import Round, Site, fake_keys, pair_secret, read_share, relay_as, signed_peers
from test_secagg import _assert_is_weighted_mean, _global_arrays, _run_secagg, _site_updates

from fedtune.errors import FedtuneError
from fedtune.secagg.signed_keys import SIGNATURES_RECORD, PeerSet, advertisement_bytes, sign, survivors_bytes
from fedtune.secagg.signed_keys import load_identity_key as load_key

MEMBERS = ["bank-a", "bank-b", "bank-c", "bank-d"]  # the sites that agreed, among themselves, to aggregate
A, B, T, K = 11, 12, 13, 14  # node ids: two honest sites, the target, and a member colluding with the coordinator
S1, S2 = 21, 22  # sybils: nodes the coordinator registered itself
NAMES = {A: "bank-a", B: "bank-b", T: "bank-c", K: "bank-d"}


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages built outside a ServerApp take their run id from Flower's task identity."""
    from flwr.supercore.task_identity import TaskIdentity
    from support.hostile_secagg import RUN_ID

    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    folder = tmp_path_factory.mktemp("members")
    return folder / "peers", signed_peers(folder, MEMBERS)


def make_sites(
    signed: bool, keys: tuple[Path, dict[str, Path]], nodes: list[int], colluders: int = 0
) -> dict[int, Site]:
    """Member sites (`signed`: with their peers' keys) and sybils (plain code run for the coordinator)."""
    peers_dir, private = keys
    sites = {}
    for nid in nodes:
        name = NAMES.get(nid, f"sybil-{nid}")
        peers = None
        if signed and nid in NAMES:
            peers = PeerSet.load(private[name], peers_dir, colluders if nid != K else 0)
        sites[nid] = Site(nid, name, peers, seed=nid)
    return sites


@dataclass(frozen=True)
class Roles:
    """Which node plays which part in an attack (in-process: the constants above; through a
    ServerApp: the node ids of the partitions), and the run id the sites sign with."""

    A: int = A
    B: int = B
    T: int = T
    K: int = K
    S1: int = S1
    S2: int = S2
    run_id: int = 4711


def sign_for_sybils(rnd: Round, tmp: Path, r: Roles) -> None:
    """Sybils sign their keys with identity keys of their own (the coordinator's, not a member's)."""
    from fedtune.client.deployment import site_keypair

    for nid in (r.S1, r.S2):
        if nid in rnd.keys and nid not in rnd.ads:
            key = load_key(site_keypair(tmp / f"sybil-{nid}", f"sybil-{nid}")[0])
            rnd.ads[nid] = sign(key, advertisement_bytes(r.run_id, "1", nid, *rnd.keys[nid]))


def close_to(recovered: list[np.ndarray] | None, update: list[np.ndarray]) -> bool:
    return recovered is not None and all(np.allclose(r, u, atol=1e-4) for r, u in zip(recovered, update, strict=True))


def attack_sybils(sites: dict[int, Any], tmp: Path, r: Roles = Roles()) -> Round:
    """(a) The target alone with two nodes the coordinator registered: they hold enough
    shares of its self-mask, and their own mask keys give every pairwise mask."""
    rnd = Round(sites, threshold=2)
    rnd.setup()
    sign_for_sybils(rnd, tmp, r)
    for nid in sites:
        rnd.share_keys(nid)
    rnd.target_view, rnd.partners = dict(rnd.keys), [r.S1, r.S2]
    for nid in sites:
        rnd.collect(nid)
    for nid in (r.S1, r.S2):
        rnd.learn_from(sites[nid])
    secrets = {n: pair_secret(sites[n].secrets().sk1, rnd.keys[r.T][0]) for n in (r.S1, r.S2) if r.T in rnd.keys}
    rnd.recovered = rnd.recover(r.T, secrets)  # type: ignore[attr-defined]
    return rnd


def attack_too_few(sites: dict[int, Any], tmp: Path, r: Roles = Roles()) -> Round:
    """(b) A round of the target and one member that colludes: the sum of two is one
    site's update once the other hands over its own."""
    rnd = Round(sites, threshold=2)
    rnd.setup()
    for nid in sites:
        rnd.share_keys(nid)
    rnd.target_view, rnd.partners = dict(rnd.keys), [r.K]
    for nid in sites:
        rnd.collect(nid)
    rnd.unmask(r.T, active=[r.T, r.K], dead=[])
    rnd.learn_from(sites[r.K])
    secrets = {r.K: pair_secret(sites[r.K].secrets().sk1, rnd.keys[r.T][0])} if r.T in rnd.keys else {}
    rnd.recovered = rnd.recover(r.T, secrets)  # type: ignore[attr-defined]
    return rnd


def attack_equivocation(sites: dict[int, Any], tmp: Path, r: Roles = Roles(), threshold: int = 2) -> Round:
    """(c) Every site sends its masked vector; the coordinator then tells bank-a that the
    target dropped (so bank-a reveals its share of the target's mask key) and tells the
    target it survived (so it reveals its self-mask share); a colluding member gives both,
    and, where sites sign survivor lists, signs both lists."""
    rnd = Round(sites, threshold=threshold)
    rnd.setup()
    for nid in sites:
        rnd.share_keys(nid)
    rnd.target_view, rnd.partners = dict(rnd.keys), [r.A, r.K]
    for nid in sites:
        rnd.collect(nid)
    told_a, told_t = [r.A, r.K], [r.A, r.K, r.T]
    signed: dict[str, dict[int, bytes]] = {"a": {}, "t": {}}
    if rnd.ads:  # signed SecAgg+: the consistency stage, lied through
        for nid, listed, key in ((r.A, told_a, "a"), (r.T, told_t, "t")):
            if rnd.consistency(nid, listed):
                signed[key][nid] = rnd.survivor_sigs[nid]
            signed[key][r.K] = sign(sites[r.K].peers.identity, survivors_bytes(r.run_id, "1", listed))
    rnd.unmask(r.A, active=told_a, dead=[r.T], signatures=signed["a"])
    rnd.unmask(r.T, active=told_t, dead=[], signatures=signed["t"])
    rnd.learn_from(sites[r.K])
    rnd.recovered = rnd.recover(r.T)  # type: ignore[attr-defined]
    return rnd


def attack_substituted_keys(sites: dict[int, Any], tmp: Path, r: Roles = Roles()) -> Round:
    """(d) The coordinator shows the target its own keys in place of bank-a's and bank-b's:
    it reads the shares the target encrypts for them and shares every pairwise mask."""
    target, others = r.T, (r.A, r.B)
    rnd = Round(sites, threshold=2)
    rnd.setup()
    fakes = {nid: fake_keys() for nid in others}
    view = {target: rnd.keys[target], **{nid: (f[1], f[3]) for nid, f in fakes.items()}} if target in rnd.keys else {}
    rnd.target_view, rnd.partners = view, list(others)
    if view and rnd.share_keys(target, view):
        for dst in others:
            for src, ciphertext in rnd.outbox.get(dst, []):
                if src == target:
                    b_share, sk1_share = read_share(fakes[dst][2], rnd.keys[target][1], ciphertext)
                    rnd.b_shares.setdefault(target, []).append(b_share)
                    rnd.sk1_shares.setdefault(target, []).append(sk1_share)
        forged = [(nid, relay_as(fakes[nid][2], rnd.keys[target][1], nid, target)) for nid in others]
        rnd.collect(target, forged)
    secrets = {nid: pair_secret(fakes[nid][0], rnd.keys[target][0]) for nid in others} if target in rnd.keys else {}
    rnd.recovered = rnd.recover(target, secrets)  # type: ignore[attr-defined]
    return rnd


ATTACKS = {
    "sybils": (attack_sybils, [T, S1, S2], 0, "keys are not signed by any of its 4 peers"),
    "too-few-honest": (attack_too_few, [T, K], 1, "refuses SecAgg+ with threshold 2 of 2 sites"),
    "equivocation": (attack_equivocation, [A, T, K], 1, "refuses SecAgg+ with threshold 2 of 3 sites"),
    "substituted-keys": (attack_substituted_keys, [A, B, T], 0, "keys are not signed by any of its 4 peers"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_unmasks_a_site_under_plain_secagg(
    attack: str, keys: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    run, nodes, colluders, _ = ATTACKS[attack]
    sites = make_sites(False, keys, nodes)
    rnd = run(sites, tmp_path)
    assert close_to(rnd.recovered, sites[T].update), attack  # type: ignore[attr-defined]
    assert not any(s.refusals for s in sites.values()), {s.name: s.refusals for s in sites.values()}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_sites_with_their_peers_keys_refuse_each_attack_before_revealing_a_share(
    attack: str, keys: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    run, nodes, colluders, refusal = ATTACKS[attack]
    sites = make_sites(True, keys, nodes, colluders)
    rnd = run(sites, tmp_path)
    assert rnd.recovered is None or not close_to(rnd.recovered, sites[T].update)  # type: ignore[attr-defined]
    assert T not in rnd.masked or len(set(rnd.b_shares.get(T, []))) < rnd.threshold
    honest = [s for nid, s in sites.items() if nid in (A, B, T)]
    said = [line for s in honest for line in s.refusals]
    assert any(refusal in line for line in said), said
    assert all("\n" not in line and len(line) < 300 for line in said)


def test_equivocation_with_a_safe_threshold_is_refused_at_the_consistency_check(
    keys: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """With t = 3 of 3 (safe for one colluder) the coordinator's two survivor lists each
    gather fewer than t signatures: bank-a will not sign a list below t, and the target sees
    only 2 of the 3 signatures it needs over its list; neither reveals a share."""
    sites = make_sites(True, keys, [A, T, K], colluders=1)
    rnd = attack_equivocation(sites, tmp_path, threshold=3)
    assert T in rnd.masked and rnd.recovered is None  # type: ignore[attr-defined]
    assert not rnd.sk1_shares.get(T, [])[:-1]  # only the colluder's own share of the target's key
    assert any("refuses to sign 2 survivors, below the threshold" in r for r in sites[A].refusals), sites[A].refusals
    assert any("only 2 of the 3 signatures" in r for r in sites[T].refusals), sites[T].refusals


def set_up(signed: bool, keys: tuple[Path, dict[str, Path]]) -> tuple[dict[int, Site], Round]:
    """Three member sites, past an honest setup stage."""
    sites = make_sites(signed, keys, [A, B, T])
    rnd = Round(sites, threshold=2)
    rnd.setup()
    return sites, rnd


def test_the_honest_signed_round_unmasks_the_sum_and_nothing_else(keys: tuple[Path, dict[str, Path]]) -> None:
    sites, rnd = set_up(True, keys)
    assert sorted(rnd.ads) == [A, B, T]
    for nid in sites:
        assert rnd.share_keys(nid)
    for nid in sites:
        assert rnd.collect(nid)
    for nid in sites:
        assert rnd.consistency(nid, [A, B, T])
    for nid in sites:
        assert rnd.unmask(nid, active=[A, B, T], dead=[])
    assert not any(s.refusals for s in sites.values())
    assert all(len(rnd.b_shares[n]) == 3 for n in sites) and not rnd.sk1_shares  # self-mask shares only
    # A key exchange with more sites than the setup announced is refused (the threshold was checked for 3).
    extra, _ = set_up(True, keys)
    more = Round({**extra, K: make_sites(True, keys, [K])[K]}, threshold=2)
    more.setup(n=3)
    assert not more.share_keys(A) and "the setup said 3" in extra[A].refusals[-1]
    # A second, different survivor list in the same round is refused.
    assert not sites[A].send({"stage": "fedtune-consistency", "survivors": [A, B]})
    assert "a second, different survivor list" in sites[A].refusals[-1]


def test_a_site_without_peers_refuses_signed_rounds_and_one_with_peers_unsigned_ones(
    keys: tuple[Path, dict[str, Path]],
) -> None:
    plain, rnd = set_up(False, keys)
    for nid in plain:
        assert rnd.share_keys(nid)
    for nid in plain:
        assert rnd.collect(nid)
    assert not rnd.consistency(A, [A, B, T]) and "runs plain SecAgg+ (no --peers)" in plain[A].refusals[-1]
    signed, rnd = set_up(True, keys)
    rnd.ads.clear()  # a coordinator running Flower's plain workflow forwards no signatures
    assert not rnd.share_keys(A)
    assert (
        "without its peers' signatures" in signed[A].refusals[-1] and "secagg-active = true" in signed[A].refusals[-1]
    )


def test_bad_peer_folders_are_one_line(keys: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    peers_dir, private = keys
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FedtuneError, match="no .pub files"):
        PeerSet.load(private["bank-a"], empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.pub").write_text("not a key\n")
    with pytest.raises(FedtuneError, match=r"x.pub: not an OpenSSH public key"):
        PeerSet.load(private["bank-a"], bad)
    with pytest.raises(FedtuneError, match="not an unencrypted OpenSSH private key"):
        PeerSet.load(peers_dir / "bank-a.pub", peers_dir)
    assert PeerSet.load(private["bank-a"], peers_dir).own_name() == "bank-a"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_signed_secagg_in_flower_gives_the_plain_aggregate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    """The honest path through Flower's Simulation Engine: the coordinator's signed workflow
    and the virtual sites' signed mod give, bit for bit, the aggregate of plain SecAgg+ (the
    masks cancel; the sites' rounding is seeded), within the documented bound of the mean."""
    from fedtune.client.deployment import site_keypair

    peers = tmp_path / "peers"
    for i in range(3):
        site_keypair(peers, f"site-{i}")
    plain, _, _ = _run_secagg(tmp_path / "plain", monkeypatch, tiny_bert_dir, sentiment_data, sites=3, rounds=1)
    signed_messages: list[int] = []

    def count(direction: str, msg: Message) -> None:
        if direction == "up" and msg.has_content() and SIGNATURES_RECORD in msg.content.config_records:
            signed_messages.append(msg.metadata.src_node_id)

    from support.wire import observe_messages

    observe_messages(monkeypatch, count)
    signed, _, audit = _run_secagg(
        tmp_path / "signed", monkeypatch, tiny_bert_dir, sentiment_data, sites=3, rounds=1,
        extra={"secagg-active": True, "secagg-peers-dir": str(peers)},
    )  # fmt: skip
    assert len(signed_messages) == 6 and len(set(signed_messages)) == 3  # keys and survivor list, per site
    for a, b in zip(_global_arrays(plain, 1), _global_arrays(signed, 1), strict=True):
        np.testing.assert_array_equal(a, b)
    _assert_is_weighted_mean(signed, _site_updates(audit, 1), 1)
    assert json.loads((signed / "summary.json").read_text())["rounds"] == 1


# Each attack in Flower: partition roles, sites, sybil partitions, colluding partitions.
IN_FLOWER: dict[str, tuple[dict[str, int], int, frozenset[int], frozenset[int]]] = {
    "sybils": ({"T": 0, "S1": 1, "S2": 2}, 3, frozenset({1, 2}), frozenset()),
    "too-few-honest": ({"T": 0, "K": 1}, 2, frozenset(), frozenset({1})),
    "equivocation": ({"A": 0, "T": 1, "K": 2}, 3, frozenset(), frozenset({2})),
    "substituted-keys": ({"A": 0, "B": 1, "T": 2}, 3, frozenset(), frozenset()),
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("signed", [False, True], ids=["plain", "signed"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_as_a_hostile_serverapp_in_flower(
    attack: str, signed: bool, tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    """The same attacks as a Flower ServerApp of the test's own, over the Simulation Engine's
    grid, against virtual sites running the product's ClientApp (their training replaced by
    a fixed update, `CannedUpdate`; sybils and a colluding member controlled through
    `Controlled`): plain SecAgg+ hands the coordinator the target's update, sites holding
    their peers' keys (`secagg-peers-dir`, 4 members) refuse first."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.supercore.task_identity import TaskIdentity
    from support.hostile_secagg import Controlled, GridSite
    from support.run_configs import sentiment_config
    from support.site_hooks import CannedUpdate, client_app_with

    from fedtune.cli.simulation import run_simulation
    from fedtune.client.deployment import site_keypair

    run, _, colluders, refusal = ATTACKS[attack]
    roles, num_sites, sybils, colluding = IN_FLOWER[attack]
    peers, controlled = tmp_path / "peers", tmp_path / "controlled"
    for i in range(4):
        site_keypair(peers, f"site-{i}")
    controlled.mkdir()
    outcome: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        nodes = GridSite.roles(grid, num_sites)  # partition -> node id
        r = Roles(**{role: nodes[p] for role, p in roles.items()}, run_id=TaskIdentity.run_id)  # type: ignore[arg-type]
        sites = {
            nid: GridSite(grid, nid, controlled, peers / f"site-{p}.key" if p in colluding else None)
            for p, nid in nodes.items()
        }
        outcome.update(round=run(sites, tmp_path, r), roles=r, sites=sites)

    config = {
        **sentiment_config(tiny_bert_dir, sentiment_data),
        "output-dir": str(tmp_path / "runs"),
        "secagg": True,
        **({"secagg-peers-dir": str(peers), "secagg-max-colluders": colluders} if signed else {}),
    }
    client_app = client_app_with(outer=[Controlled(str(controlled), sybils, colluding)], inner=[CannedUpdate()])
    run_simulation(config, num_sites=num_sites, client_app=client_app, server_app=app)
    rnd, r, sites = outcome["round"], outcome["roles"], outcome["sites"]
    if not signed:
        assert close_to(rnd.recovered, sites[r.T].update), attack
        return
    assert rnd.recovered is None or not close_to(rnd.recovered, sites[r.T].update)
    honest = [sites[n] for n in (r.A, r.B, r.T) if n in sites]
    said = [line for site in honest for line in site.refusals]
    assert any(refusal in line for line in said), said


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_signed_secagg_keeps_dropout_tolerance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    """4 signed sites (t = 3), one fails in training after the key exchange: the 3 survivors
    sign the survivor list, reveal the dropped site's mask-key shares, and the round is their
    weighted mean, as under plain SecAgg+."""
    from fedtune.client.deployment import site_keypair

    peers = tmp_path / "peers"
    for i in range(4):
        site_keypair(peers, f"site-{i}")
    run_dir, _, audit = _run_secagg(
        tmp_path, monkeypatch, tiny_bert_dir, sentiment_data, sites=4, rounds=1, fail_at="site-2@1",
        extra={"secagg-active": True, "secagg-peers-dir": str(peers)},
    )  # fmt: skip
    updates = _site_updates(audit, 1)
    assert sorted(updates) == ["site-0", "site-1", "site-3"]
    _assert_is_weighted_mean(run_dir, updates, 1)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert not record.get("skipped") and record["failures"] == 1
