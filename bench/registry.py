"""Registry throughput and concurrency on loopback, against a plain local file copy.

The demo's bundle (exported from the newest demo run with a throw-away key) is
published to a `fedtune registry serve` process over TLS on 127.0.0.1. Then, in this
process:
- one device pull (download, sha256 + signature check, activation) vs `shutil.copyfile`
  of the same files, median of several repeats: `registry_over_file_copy_throughput`;
- 20 devices pulling at once, several times: p50 and p99 of one pull's seconds.

    python bench/registry.py [--run-dir runs/<id>] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # support/: free ports

from demo_run import WORK, find_demo_run  # noqa: E402
from results import update_results  # noqa: E402
from support.processes import free_port, wait_for_port  # noqa: E402

from fedtune.edge_device.pull import pull  # noqa: E402
from fedtune.edge_export.release import release_bundle  # noqa: E402
from fedtune.edge_export.signing import generate_keypair  # noqa: E402
from fedtune.registry.publisher import publish  # noqa: E402
from fedtune.tls import create_ca, issue  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a finished demo run (default: the newest one found)")
    parser.add_argument("--repeats", type=int, default=5, help="single-pull and copy repeats")
    parser.add_argument("--concurrent-rounds", type=int, default=3, help="rounds of 20 simultaneous pulls")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from fedtune.edge_export.exporter import export_bundle

    work = Path(tempfile.mkdtemp(prefix="registry-bench-", dir=WORK if WORK.exists() else None))
    server = None
    try:
        private, public = generate_keypair(work / "keys")
        bundle = work / "bundle"
        export_bundle(args.run_dir or find_demo_run(), bundle, private, limit=200)
        create_ca(work / "pki")
        issue(work / "pki", "server", ["127.0.0.1"])
        (work / "token").write_text("bench-token\n")
        ca = (work / "pki" / "ca.pem").read_bytes()
        port = free_port()
        fedtune = Path(sys.executable).parent / "fedtune"
        server_log = open(work / "registry.log", "wb")
        server = subprocess.Popen(
            [
                str(fedtune),
                "registry",
                "serve",
                "--store",
                str(work / "store"),
                "--address",
                f"127.0.0.1:{port}",
                "--cert",
                str(work / "pki/server.pem"),
                "--key",
                str(work / "pki/server.key"),
                "--token-file",
                str(work / "token"),
                "--trust-key",
                str(public),
            ],
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        address = f"127.0.0.1:{port}"
        wait_for_port(port, server, work / "registry.log")
        released = work / "release-v1"
        release_bundle(bundle, "banking77", "v1", private, released, 1)
        publish(address, released, "banking77", "v1", "bench-token", ca)
        files = sorted(p for p in bundle.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in files)

        def copy_once(i: int) -> float:
            dest = work / f"copy-{i}"
            dest.mkdir()
            start = time.perf_counter()
            for f in files:
                shutil.copyfile(f, dest / f.name)
            elapsed = time.perf_counter() - start
            shutil.rmtree(dest)
            return elapsed

        def pull_once(tag: str) -> float:
            dest = work / f"device-{tag}"
            start = time.perf_counter()
            pull(address, "banking77", public, dest, ca=ca)
            elapsed = time.perf_counter() - start
            shutil.rmtree(dest)
            return elapsed

        pull_once("warm")
        copy_once(-1)
        copies = [copy_once(i) for i in range(args.repeats)]
        pulls = [pull_once(f"single-{i}") for i in range(args.repeats)]
        concurrent: list[float] = []
        for r in range(args.concurrent_rounds):
            with ThreadPoolExecutor(max_workers=20) as pool:
                concurrent += list(pool.map(lambda i: pull_once(f"c{r}-{i}"), range(20)))
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    mb = total / 1e6
    copy_mbps, pull_mbps = mb / statistics.median(copies), mb / statistics.median(pulls)
    keys = {
        "registry_over_file_copy_throughput": round(pull_mbps / copy_mbps, 4),
        "registry_concurrent20_p50_s": round(float(np.percentile(concurrent, 50)), 3),
        "registry_concurrent20_p99_s": round(float(np.percentile(concurrent, 99)), 3),
    }
    (WORK / "registry.json").write_text(
        json.dumps(
            {"bundle_mb": mb, "copies": copies, "pulls": pulls, "concurrent": concurrent, "keys": keys}, indent=2
        )
    )
    md = f"""## Registry: pull over gRPC vs a local file copy (`bench/registry.py`)

The demo's signed INT8 bundle ({mb:.1f} MB, {len(files)} files) served by `fedtune registry serve` (a separate
process, TLS, 1 MiB chunks) on 127.0.0.1; the devices are threads of the benchmark process. A pull is the
whole device path: manifest, signature check, chunked download, sha256 of every file, atomic activation.

| | median seconds | MB/s |
|---|---|---|
| `shutil.copyfile` of the bundle's files ({args.repeats} repeats) | {statistics.median(copies):.3f} | {copy_mbps:.0f} |
| one device pull ({args.repeats} repeats) | {statistics.median(pulls):.3f} | {pull_mbps:.0f} |

`registry_over_file_copy_throughput` = {keys["registry_over_file_copy_throughput"]}.

20 devices pulling at once ({args.concurrent_rounds} rounds, {len(concurrent)} pulls): p50 {keys["registry_concurrent20_p50_s"]} s,
p99 {keys["registry_concurrent20_p99_s"]} s per pull (all verified). On 2 cores the 20 pulls share the CPU with the
server's TLS and the devices' sha256 checks, so a pull's time grows with the number of devices.
"""
    print(json.dumps(keys, indent=2))
    if not args.no_write:
        update_results("registry", keys, md)


if __name__ == "__main__":
    main()
