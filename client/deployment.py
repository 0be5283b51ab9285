"""The site's side of a deployment: pre-flight checks that turn a bad data file, a
wrong CA or an unregistered key into one line, the exact `flower-supernode` command
line, and running that SuperNode under the site's one command, relaying its output
and stopping it (and the helpers Flower detaches from it) on exit or on a signal."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import threading
from pathlib import Path

from fedtune.data import load_classification, load_completions
from fedtune.errors import FedtuneError
from fedtune.flower_env import child_env, tool

UNREGISTERED_KEY = "[code: 2004]"  # flower-supernode: "[code: 2004] Failed to activate SuperNode."


def check_tls(superlink: str, ca: Path, timeout: float = 10.0) -> None:
    """Connect to the SuperLink and verify its certificate against `ca`."""
    host, _, port = superlink.rpartition(":")
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError) as err:
        raise FedtuneError(f"{ca}: not a usable CA certificate ({err})") from None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as err:
        raise FedtuneError(f"{ca}: the SuperLink at {superlink} presents a certificate this CA did not sign "
                           f"({err.verify_message}); ask the coordinator for the right ca.pem") from None
    except ssl.SSLError as err:
        raise FedtuneError(f"{superlink}: TLS handshake failed ({err.reason}); is it a TLS SuperLink?") from None
    except OSError as err:
        raise FedtuneError(f"{superlink}: cannot connect ({err.strerror or err})") from None


def check_site_data(data: Path, task: str, text_field: str, label_field: str, prompt_field: str,
                    completion_field: str) -> int:
    """Validate the site's data file the way training will read it; returns its size."""
    if task == "seq-cls":
        return len(load_classification(data, text_field, label_field, None))
    return len(load_completions(data, prompt_field, completion_field))


def supernode_command(superlink: str, ca: Path, key: Path, data: Path, port: int, state_dir: Path,
                      max_retries: int | None = None, site_name: str = "") -> list[str]:
    node_config = f'data-path="{data.resolve()}" state-dir="{state_dir.resolve()}" site-name="{site_name or data.stem}"'
    cmd = [tool("flower-supernode"), "--superlink", superlink, "--root-certificates", str(ca),
           "--auth-supernode-private-key", str(key), "--node-config", node_config, "--port", str(port)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def stop_helpers(pid: int) -> None:
    """Stop the helpers Flower detaches from a process (they carry `--parent-pid PID`)."""
    subprocess.run(["pkill", "-TERM", "-f", f"[-]-parent-pid {pid}( |$)"], capture_output=True)


def explain_supernode_exit(code: int, output: str, key: Path, superlink: str) -> str:
    if UNREGISTERED_KEY in output:
        return (f"{key}: this site's key is not registered with the SuperLink at {superlink}; send "
                f"{key.with_suffix('.pub').name} to the coordinator (fedtune deploy register)")
    last = [line for line in output.splitlines() if line.strip()][-3:]
    return f"the SuperNode stopped with exit code {code}: {' / '.join(x.strip() for x in last)}"


def run_supernode(cmd: list[str], key: Path, superlink: str) -> None:
    """Run the SuperNode in the foreground, relaying its output, until it exits or this
    process gets SIGTERM/SIGINT; an exit other than a requested stop is one line."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: child.terminate())
    output: list[str] = []

    def relay() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            output.append(line)
            print(line, end="", flush=True)

    # Read in a thread: Flower's detached SuperExec helper inherits the pipe and may
    # hold it open after the SuperNode itself has exited.
    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    code = child.wait()
    reader.join(timeout=2)
    stop_helpers(child.pid)
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        raise FedtuneError(explain_supernode_exit(code, "".join(output), key, superlink))
