"""The SuperLink's public face: an nginx reverse proxy that terminates the sites' TLS,
optionally requires a client certificate signed by the deployment CA, and forwards
Flower's Fleet API (`POST /v1/fleet/<method>`) and nothing else to the SuperLink,
which listens on loopback only.

Flower 1.41 serves the Fleet, Control (submit and list runs, register SuperNodes) and
ServerApp (`/v1/runtime/`) APIs over HTTP on one port, and the open-source Control API
has no authentication. Behind this proxy only the coordinator's machine reaches the
last two. The proxy matches the raw request line, not nginx's normalised path, so
`/v1/fleet/../control/...` or percent-encoded variants are refused too (404).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import FedtuneError

INSTALL_NGINX = (
    "nginx not found: install it (Debian/Ubuntu: sudo apt-get install nginx; macOS: brew install "
    "nginx), or run the SuperLink with --no-proxy (sites on this machine only)"
)
FLEET_METHOD = r"^/v1/fleet/[a-z][a-z-]*$"  # every Fleet API call: POST, no query string
UPSTREAM_NAME = "localhost"  # the name nginx checks on the SuperLink's certificate


@dataclass(frozen=True)
class ProxySettings:
    """Where the proxy listens, where the SuperLink is, and the TLS material it uses."""

    listen_host: str
    listen_port: int
    superlink_port: int
    certificate: Path
    private_key: Path
    ca: Path
    require_client_cert: bool = False
    max_body_mb: int = 1024


def find_nginx() -> str:
    """The nginx binary (PATH, then /usr/sbin where Debian puts it), or one line on how to get it."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/opt/homebrew/bin")
    if found is None:
        raise FedtuneError(INSTALL_NGINX)
    return found


def nginx_config(settings: ProxySettings, folder: Path) -> str:
    """The whole nginx.conf: one server, Fleet API only, state and logs under `folder`."""
    listen = f"[{settings.listen_host}]" if ":" in settings.listen_host else settings.listen_host
    client_cert = (
        f"        ssl_client_certificate {settings.ca};\n        ssl_verify_client on;\n        ssl_verify_depth 1;\n"
        if settings.require_client_cert
        else ""
    )
    return f"""# Written by `fedtune deploy superlink`; rewritten at every start.
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/tmp/body;
    proxy_temp_path {folder}/tmp/proxy;
    fastcgi_temp_path {folder}/tmp/fastcgi;
    uwsgi_temp_path {folder}/tmp/uwsgi;
    scgi_temp_path {folder}/tmp/scgi;
    server_tokens off;
    upstream superlink {{
        server 127.0.0.1:{settings.superlink_port};
        keepalive 16;
    }}
    server {{
        listen {listen}:{settings.listen_port} ssl;
        ssl_certificate {settings.certificate};
        ssl_certificate_key {settings.private_key};
        ssl_protocols TLSv1.2 TLSv1.3;
{client_cert}        client_max_body_size {settings.max_body_mb}m;

        location /v1/fleet/ {{
            if ($request_uri !~ "{FLEET_METHOD}") {{ return 404; }}
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_ssl_trusted_certificate {settings.ca};
            proxy_ssl_verify on;
            proxy_ssl_name {UPSTREAM_NAME};
            proxy_ssl_session_reuse on;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
            # Stream bodies both ways: no temp files (nginx's workers may not be able to write
            # under the deployment folder), and an adapter upload starts reaching Flower at once.
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_max_temp_file_size 0;
        }}
        location / {{ return 404; }}
    }}
}}
"""


def write_proxy(settings: ProxySettings, folder: Path) -> Path:
    """Write `folder/nginx.conf` (and its temp folders), and have nginx check it."""
    for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(nginx_config(settings, folder.resolve()))
    check = subprocess.run([*_nginx_args(folder), "-t"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        lines = [x for x in check.stderr.splitlines() if "[emerg]" in x or "[alert]" in x] or check.stderr.splitlines()
        raise FedtuneError(f"{conf}: nginx refused the proxy configuration: {(lines or ['no output'])[-1].strip()}")
    return conf


def proxy_command(folder: Path) -> list[str]:
    """nginx in the foreground with the configuration `write_proxy` wrote."""
    return [*_nginx_args(folder), "-g", "daemon off;"]


def _nginx_args(folder: Path) -> list[str]:
    folder = folder.resolve()
    return [find_nginx(), "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(folder / "nginx.conf")]
