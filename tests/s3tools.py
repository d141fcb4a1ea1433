"""Loopback-only test servers: an S3-compatible moto server and `python -m http.server`.

Both bind 127.0.0.1 and record the HTTP methods they receive, so tests can prove that
reading a remote cache never writes to it.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from tests.clitools import free_port

WRITES = ("PUT", "POST", "DELETE", "PATCH")
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Server:
    endpoint: str
    requests: list = field(default_factory=list)

    def writes(self, since: int = 0) -> list:
        """(method, path) of every write request received after request number `since`."""
        return [r for r in self.requests[since:] if r[0] in WRITES]


def start_moto(bucket: str = "team") -> tuple[Server, object]:
    """A ThreadedMotoServer on 127.0.0.1 whose requests are recorded; creates `bucket`."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    rec = Server(f"http://{host}:{port}")
    inner = server._server.app  # the WSGI app werkzeug serves

    def app(environ, start_response):
        rec.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        return inner(environ, start_response)

    server._server.app = app
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": rec.endpoint}, skip_instance_cache=True).mkdir(
        bucket
    )
    return rec, server


def start_http(directory: str) -> tuple[Server, subprocess.Popen]:
    """`python -m http.server` serving `directory` on 127.0.0.1 (GET/HEAD only: it answers
    501 to writes, which the access log records)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    rec = Server(f"http://127.0.0.1:{port}")
    for _ in range(100):
        try:
            urllib.request.urlopen(rec.endpoint + "/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return rec, proc


def http_requests(proc: subprocess.Popen) -> list[tuple[str, str]]:
    """(method, path) from the access log of a stopped http.server."""
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    out = []
    for line in err.splitlines():
        if '"' in line:
            parts = line.split('"')[1].split()
            if len(parts) >= 2:
                out.append((parts[0], parts[1]))
    return out
