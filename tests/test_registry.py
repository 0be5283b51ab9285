"""The model registry over real gRPC with TLS on 127.0.0.1: release -> publish -> pull ->
predict, resumed downloads, a tampered store, downgrades and renamed bundles (refused on
the device, the active version stays), bad names, credentials, mTLS, 20 concurrent pulls,
and the generated stubs against the .proto."""

from __future__ import annotations

import contextlib
import filecmp
import itertools
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from support.registry_server import TOKEN, Registry, make_pki

from fedtune.edge_device import pull as device_pull
from fedtune.edge_device.pull import (
    PullError,
    PullInterrupted,
    active_version,
    pull,
    rollback,
)
from fedtune.edge_device.runtime import EdgeModel
from fedtune.registry.publisher import publish
from fedtune.registry.v1 import registry_pb2 as pb

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def registry(tmp_path: Path, pki: dict[str, bytes], keys: dict[str, Path]) -> Iterator[Registry]:
    reg = Registry(tmp_path, pki, keys)
    yield reg
    reg.server.stop(grace=None).wait()


SEQUENCE = itertools.count(1)


def _publish(
    reg: Registry,
    bundle: Path,
    version: str,
    model: str = "banking",
    key: Path | None = None,
    sequence: int | None = None,
) -> Path:
    """Release `bundle` as `model` `version` (by default with the next sequence number) and publish it."""
    return reg.publish(bundle, model, version, next(SEQUENCE) if sequence is None else sequence, key)


@pytest.mark.timeout(600)
def test_a_candidate_reaches_sites_only_and_a_promoted_release_names_its_gate(
    tmp_path: Path, registry: Registry, bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path]
) -> None:
    """A candidate is published under MODEL.candidate: devices pulling MODEL never see it, a
    device sent to MODEL.candidate refuses it (the channel is signed), a site scoring it for
    the gate pulls it; the promoted release is a new signed record that names the gate."""
    from fedtune.edge_device.bundle import sha256_bytes
    from fedtune.edge_device.release import read_release
    from fedtune.edge_device.signature import load_public_key
    from fedtune.registry.store import ModelStore

    candidate = registry.publish(bert_bundle[1], "banking", "v1", next(SEQUENCE), channel="candidate")
    device = tmp_path / "device"
    with pytest.raises(PullError, match="not in the registry"):
        pull(registry.address, "banking", keys["public"], device, ca=registry.pki["ca"])
    with pytest.raises(PullError, match="a release candidate, not a release"):
        pull(registry.address, "banking.candidate", keys["public"], device, ca=registry.pki["ca"])
    assert active_version(device) is None
    site = pull(
        registry.address, "banking.candidate", keys["public"], tmp_path / "site", ca=registry.pki["ca"], candidate=True
    )
    assert site.version == "v1"
    # The registry itself refuses a candidate under the release name, and a release under the candidate's.
    store = ModelStore(tmp_path / "other-store", keys["public"])
    staging = store.begin("banking", "v1")
    shutil.copytree(candidate, staging, dirs_exist_ok=True)
    with pytest.raises(Exception, match="cannot be published as 'banking'"):
        store.commit("banking", "v1", staging)
    gate = "passed: federation accuracy drop 0.2 pt <= 1.0 pt (3 sites)"
    registry.publish(candidate, "banking", "v1", next(SEQUENCE), gate=gate)
    got = pull(registry.address, "banking", keys["public"], device, ca=registry.pki["ca"])
    digest = sha256_bytes((got.path / "manifest.json").read_bytes())
    record = read_release(got.path, load_public_key(keys["public"]), digest)
    assert record.gate == gate and record.channel == "release"


@pytest.mark.timeout(900)
def test_publish_pull_predict_and_rollback(
    registry: Registry, bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path], tmp_path: Path
) -> None:
    _, bundle, manifest = bert_bundle
    _publish(registry, bundle, "v1")
    listing = registry.stub().ListModels(pb.ListModelsRequest())
    assert [(m.name, m.latest_version, m.num_versions) for m in listing.models] == [("banking", "v1", 1)]
    device = tmp_path / "device"
    first = pull(registry.address, "banking", keys["public"], device, ca=registry.pki["ca"])
    assert first.version == "v1" and active_version(device) == "v1" and first.resumed_bytes == 0
    model = EdgeModel.load(device / "current", keys["public"])
    assert model.classify(["good great"])[0].label in manifest["labels"]

    _publish(registry, bundle, "v2")
    versions = registry.stub().ListVersions(pb.ListVersionsRequest(model="banking")).versions
    assert [v.version for v in versions] == ["v1", "v2"] and all(v.total_bytes > 0 for v in versions)
    assert pull(registry.address, "banking", keys["public"], device, ca=registry.pki["ca"]).version == "v2"
    assert (active_version(device), active_version(device, "previous")) == ("v2", "v1")
    assert rollback(device) == "v1"
    assert (active_version(device), active_version(device, "previous")) == ("v1", "v2")
    assert EdgeModel.load(device / "current", keys["public"]).task == "seq-cls"


@contextlib.contextmanager
def _connection_cut_after(limit: int) -> Iterator[None]:
    """The device's download streams are cancelled (a real gRPC CANCELLED) once `limit`
    bytes have arrived, as when a device loses its connection part-way."""
    real_stub = device_pull.rpc.ModelRegistryStub
    received = 0

    class CuttingStub(real_stub):  # type: ignore[misc, valid-type]
        def __init__(self, channel: grpc.Channel) -> None:
            super().__init__(channel)
            real_download = self.Download

            def download(request: object, **kwargs: object) -> Iterator[object]:
                call = real_download(request, **kwargs)

                def chunks() -> Iterator[object]:
                    nonlocal received
                    for chunk in call:
                        yield chunk
                        received += len(chunk.data)
                        if received >= limit:
                            call.cancel()

                return chunks()

            self.Download = download

    device_pull.rpc.ModelRegistryStub = CuttingStub
    try:
        yield
    finally:
        device_pull.rpc.ModelRegistryStub = real_stub


@pytest.mark.timeout(900)
def test_cut_download_resumes_and_verifies(
    registry: Registry, bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path], tmp_path: Path
) -> None:
    _, bundle, manifest = bert_bundle
    _publish(registry, bundle, "v1")
    total = sum(e["bytes"] for e in manifest["files"].values())
    device = tmp_path / "device"
    with _connection_cut_after(total // 2), pytest.raises(PullInterrupted, match="cut after"):
        pull(registry.address, "banking", keys["public"], device, ca=registry.pki["ca"])
    assert active_version(device) is None and (device / ".incoming" / "v1").is_dir()
    result = pull(registry.address, "banking", keys["public"], device, ca=registry.pki["ca"])
    assert result.resumed_bytes >= total // 2 and result.downloaded_bytes + result.resumed_bytes == total
    assert active_version(device) == "v1" and not (device / ".incoming" / "v1").exists()
    EdgeModel.load(device / "current", keys["public"])  # verified again on load


def _device_on_v1_with_v2_published(
    registry: Registry, bundle: Path, keys: dict[str, Path], tmp_path: Path
) -> tuple[Path, Path]:
    """A device holding v1 as current, and v2 published: (device folder, v2's stored model.onnx)."""
    _publish(registry, bundle, "v1")
    device = tmp_path / "device"
    pull(registry.address, "banking", keys["public"], device, ca=registry.pki["ca"])
    _publish(registry, bundle, "v2")
    return device, registry.store_dir / "banking" / "v2" / "model.onnx"


@pytest.mark.timeout(900)
def test_tampered_store_is_refused_and_current_version_stays(
    registry: Registry, bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path], tmp_path: Path
) -> None:
    device, stored = _device_on_v1_with_v2_published(registry, bert_bundle[1], keys, tmp_path)
    data = bytearray(stored.read_bytes())
    data[len(data) // 3] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(PullError, match="refused banking v2.*sha256 does not match"):
        pull(registry.address, "banking", keys["public"], device, ca=registry.pki["ca"])
    assert active_version(device) == "v1" and not (device / "versions" / "v2").exists()
    assert not (device / ".incoming" / "v2").exists()
    EdgeModel.load(device / "current", keys["public"])


@pytest.mark.timeout(900)
def test_a_file_stream_longer_than_the_manifest_says_is_cut_and_refused(
    registry: Registry, bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path], tmp_path: Path
) -> None:
    manifest = bert_bundle[2]
    device, stored = _device_on_v1_with_v2_published(registry, bert_bundle[1], keys, tmp_path)
    with open(stored, "ab") as handle:  # the registry's disk now holds 5 MiB more than was signed
        handle.write(bytes(5 << 20))
    with pytest.raises(
        PullError,
        match=rf"refused banking v2 .*model.onnx: the registry sent more than the signed "
        rf"manifest's {manifest['files']['model.onnx']['bytes']} bytes",
    ):
        pull(registry.address, "banking", keys["public"], device, ca=registry.pki["ca"])
    assert active_version(device) == "v1" and not (device / "versions" / "v2").exists()
    partial = device / ".incoming" / "v2" / "model.onnx"
    assert not partial.exists()  # nothing past the signed size was kept


def _serve_as(reg: Registry, source: tuple[str, str], target: tuple[str, str], latest: bool = True) -> None:
    """What a compromised registry host can do: serve a stored, validly signed version under
    another model or version name (a copy in the store, appended to the model's index)."""
    shutil.copytree(reg.store_dir / source[0] / source[1], reg.store_dir / target[0] / target[1])
    index = reg.store_dir / target[0] / "versions.json"
    entries = json.loads(index.read_text())
    entry = next(
        e for e in json.loads((reg.store_dir / source[0] / "versions.json").read_text()) if e["version"] == source[1]
    )
    entries.append({**entry, "version": target[1]})
    index.write_text(json.dumps(entries))


@pytest.mark.timeout(900)
def test_downgrades_and_bundles_of_other_models_are_refused_and_the_active_version_stays(
    registry: Registry, bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path], tmp_path: Path
) -> None:
    bundle = bert_bundle[1]
    _publish(registry, bundle, "v1", sequence=10)
    v2 = _publish(registry, bundle, "v2", sequence=20)
    other = _publish(registry, bundle, "v1", model="other", sequence=5)
    device = tmp_path / "device"

    def pull_latest(**kwargs: object) -> object:
        return pull(registry.address, "banking", keys["public"], device, ca=registry.pki["ca"], **kwargs)

    assert pull_latest().version == "v2"
    # The registry itself refuses a release for another name or version, and a sequence that does not grow.
    with pytest.raises(Exception, match="FAILED_PRECONDITION.*signed for model 'other', not 'banking'"):
        _raw_publish(registry, other, "banking", "v9")
    with pytest.raises(Exception, match="FAILED_PRECONDITION.*sequence 15 is not above 20"):
        _publish(registry, bundle, "v3", sequence=15)
    with pytest.raises(Exception, match="released as banking v2, not banking v7"):
        publish(registry.address, v2, "banking", "v7", TOKEN, registry.pki["ca"])

    # A compromised registry host serves the old, validly signed v1 as the latest version ...
    _serve_as(registry, ("banking", "v1"), ("banking", "v1-again"))
    with pytest.raises(PullError, match="signed as version 'v1' \\(sequence 10\\), served as 'v1-again'"):
        pull_latest()
    shutil.rmtree(registry.store_dir / "banking" / "v1-again")
    index = registry.store_dir / "banking" / "versions.json"
    entries = [e for e in json.loads(index.read_text()) if e["version"] != "v1-again"]
    index.write_text(json.dumps([entries[1], entries[0]]))  # ... or reorders the index so that v1 is "latest"
    with pytest.raises(PullError, match="release sequence 10 is not newer than the active v2's 20 \\(a downgrade\\)"):
        pull_latest()
    # ... or serves another model's bundle under this model's name.
    _serve_as(registry, ("other", "v1"), ("banking", "v5"))
    with pytest.raises(PullError, match="signed for model 'other', not 'banking'"):
        pull_latest()
    assert active_version(device) == "v2" and sorted(p.name for p in (device / "versions").iterdir()) == ["v2"]
    assert not (device / ".incoming").exists() or not any((device / ".incoming").iterdir())
    # A rollback on purpose takes the older release.
    assert pull_latest(version="v1", allow_rollback=True).version == "v1"
    assert (active_version(device), active_version(device, "previous")) == ("v1", "v2")


def _raw_publish(reg: Registry, folder: Path, model: str, version: str) -> None:
    """Publish a folder's files as `model` `version` with the token, bypassing the publisher's own check."""
    from fedtune.registry.publisher import _requests, bundle_files

    reg.stub().Publish(
        _requests(folder, model, version, bundle_files(folder)),
        timeout=60,
        metadata=(("authorization", f"Bearer {TOKEN}"),),
    )


@pytest.mark.timeout(900)
def test_bad_names_unknown_models_and_credentials(
    registry: Registry, bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path]
) -> None:
    _, bundle, _ = bert_bundle
    _publish(registry, bundle, "v1")
    stub = registry.stub()

    def code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
        with pytest.raises(grpc.RpcError) as info:
            call()
        return info.value.code()

    assert code(lambda: stub.GetManifest(pb.GetManifestRequest(model="nope"))) == grpc.StatusCode.NOT_FOUND
    assert (
        code(lambda: stub.GetManifest(pb.GetManifestRequest(model="banking", version="v9")))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code(lambda: list(stub.Download(pb.DownloadRequest(model="banking", version="v1", file="nothere.bin"))))
        == grpc.StatusCode.NOT_FOUND
    )
    for model, version, file in (
        ("../banking", "v1", "model.onnx"),
        ("banking", "../v1", "model.onnx"),
        ("banking", "v1", "../../banking/v1/model.onnx"),
        ("a/b", "", ""),
        ("..", "v1", "x"),
    ):
        assert (
            code(lambda: list(stub.Download(pb.DownloadRequest(model=model, version=version, file=file or "x"))))
            == grpc.StatusCode.INVALID_ARGUMENT
        ), (model, version, file)
    assert (
        code(lambda: stub.GetManifest(pb.GetManifestRequest(model="banking", version="v1/../v1")))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    # Publishing: no token, a wrong token -> UNAUTHENTICATED; nothing is stored.
    header = [pb.PublishRequest(header=pb.PublishHeader(model="banking", version="v2"))]
    assert code(lambda: stub.Publish(iter(header))) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        code(lambda: stub.Publish(iter(header), metadata=(("authorization", "Bearer wrong"),)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert not (registry.store_dir / "banking" / "v2").exists()
    # A bundle signed by another key is refused by a registry that trusts the coordinator's key.
    with pytest.raises(Exception, match="FAILED_PRECONDITION"):
        _publish_foreign(registry, bundle, keys)
    # Versions are immutable.
    with pytest.raises(Exception, match="ALREADY_EXISTS"):
        _publish(registry, bundle, "v1")


def _publish_foreign(reg: Registry, bundle: Path, keys: dict[str, Path]) -> None:
    from fedtune.edge_export.signing import load_private_key, sign

    foreign = bundle.parent / "foreign-bundle"
    shutil.rmtree(foreign, ignore_errors=True)
    shutil.copytree(bundle, foreign)
    (foreign / "manifest.sig").write_bytes(
        sign(load_private_key(keys["other_private"]), (foreign / "manifest.json").read_bytes())
    )
    _publish(reg, foreign, "v-foreign", key=keys["other_private"])


@pytest.mark.timeout(900)
def test_twenty_concurrent_pulls_all_verify(
    registry: Registry, bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path], tmp_path: Path
) -> None:
    _, bundle, _ = bert_bundle
    _publish(registry, bundle, "v1")
    devices = [tmp_path / f"device-{i:02d}" for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(
            pool.map(lambda d: pull(registry.address, "banking", keys["public"], d, ca=registry.pki["ca"]), devices)
        )
    assert all(r.version == "v1" for r in results)
    for device in devices:
        assert active_version(device) == "v1"
        assert filecmp.cmp(device / "current" / "model.onnx", bundle / "model.onnx", shallow=False)


@pytest.mark.timeout(900)
def test_mtls_requires_a_device_certificate(
    tmp_path: Path, pki: dict[str, bytes], keys: dict[str, Path], bert_bundle: tuple[Path, Path, dict]
) -> None:
    reg = Registry(tmp_path, pki, keys, mtls=True)
    try:
        with pytest.raises(PullError, match="UNAVAILABLE"):
            pull(reg.address, "banking", keys["public"], tmp_path / "anon", ca=pki["ca"], timeout=10)
        with pytest.raises(grpc.RpcError):
            reg.stub().ListModels(pb.ListModelsRequest(), timeout=10)
        models = reg.stub(cert=pki["device_cert"], key=pki["device_key"]).ListModels(pb.ListModelsRequest(), timeout=10)
        assert list(models.models) == []
    finally:
        reg.server.stop(grace=None).wait()


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    from grpc_tools import protoc

    rc = protoc.main(
        [
            "protoc",
            f"-I{REPO / 'protos'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(REPO / "protos/fedtune/registry/v1/registry.proto"),
        ]
    )
    assert rc == 0
    for name in ("registry_pb2.py", "registry_pb2_grpc.py", "registry_pb2.pyi"):
        fresh = (tmp_path / "fedtune/registry/v1" / name).read_text()
        assert (REPO / "registry/v1" / name).read_text() == fresh, f"{name} is stale: run `make protos`"


@pytest.mark.timeout(900)
def test_registry_demo_script_stops_its_server(
    bert_bundle: tuple[Path, Path, dict], keys: dict[str, Path], tmp_path: Path
) -> None:
    """The CLI path `make demo` uses: serve, publish, pull, predict, then the server is stopped."""
    _, bundle, _ = bert_bundle
    out = subprocess.run(
        ["bash", str(REPO / "scripts/registry_demo.sh"), str(bundle), str(keys["public"]), "good great"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={
            **__import__("os").environ,
            "FEDTUNE_BIN": str(Path(sys.executable).parent / "fedtune"),
            "REGISTRY_WORK": str(tmp_path / "work"),
        },
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "published" in out.stdout and "current ->" in out.stdout
    pid = int((tmp_path / "work" / "registry.pid").read_text())
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0  # stopped
