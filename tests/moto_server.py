"""moto in server mode, as a separate process on 127.0.0.1: the S3/EBS/EC2 endpoint the
cloud-store tests and benchmarks talk to through real HTTP and SigV4 (never ``mock_aws``).

A subprocess rather than a thread: the server does not compete for the test process's
GIL, and a test can kill clients without touching it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on a free port; :meth:`reset` wipes all state."""

    def __init__(self, *, part_min_size: int | None = 64 << 10):
        self.part_min_size = part_min_size
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "MotoServer":
        for _ in range(5):
            self.port = free_port()
            env = dict(os.environ)
            if self.part_min_size is not None:
                # S3 wants 5 MiB parts; tests use small packs, so moto takes small parts
                env["S3_UPLOAD_PART_MIN_SIZE"] = str(self.part_min_size)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break           # port taken, most likely: try another
                try:
                    urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).read()
                    return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError("moto server did not start")

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client_env(self, endpoint: str | None = None) -> dict:
        """Environment for a process (the CLI) that should use this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": endpoint or self.url,
        }

    def boto3_client(self, service: str, endpoint: str | None = None, *, retries: bool = True):
        import boto3
        from botocore.config import Config
        config = None if retries else Config(retries={"total_max_attempts": 1})
        return boto3.client(service, endpoint_url=endpoint or self.url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=config)
