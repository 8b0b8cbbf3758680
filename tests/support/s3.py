"""A real S3-compatible server for the artifact store's tests and benchmark: moto's server mode on a free port of
127.0.0.1 (nothing closer to production, such as MinIO, installs from PyPI here)."""

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

KEY, SECRET, REGION = "test", "test", "us-east-1"


@contextlib.contextmanager
def running_s3_server(timeout_s: float = 10.0):
    """Start moto_server, wait until it answers, yield its endpoint URL, stop it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def create_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY, aws_secret_access_key=SECRET
    ).create_bucket(Bucket=name)


def storage_options(endpoint: str) -> dict:
    """fsspec (s3fs) options for the server at `endpoint`."""
    return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION}}
