"""A moto S3 server on 127.0.0.1 that can be stopped and started again on the same port
(its buckets and objects live in the process, so they survive the outage)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing", "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
BUCKET = "searchd-faults"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Store:
    """``start()``, ``stop()``, ``outage(seconds)`` (in a thread), ``uri(key)``, ``keys()``."""

    def __init__(self) -> None:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
        os.environ.update(AWS_ENV)
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.server: Any = None
        self.start()
        import boto3

        self.client = boto3.client("s3", endpoint_url=f"http://{self.endpoint}",
                                   region_name="us-east-1")
        self.client.create_bucket(Bucket=BUCKET)

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        for _ in range(100):  # the port may linger for a moment after a stop
            try:
                self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                                 verbose=False)
                self.server.start()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto could not listen on {self.endpoint} again")

    def stop(self) -> None:
        self.server.stop()

    def outage(self, seconds: float) -> threading.Thread:
        """Stop now, start again after ``seconds`` (in a thread, returned started)."""
        self.stop()

        def back() -> None:
            time.sleep(seconds)
            self.start()

        t = threading.Thread(target=back, daemon=True)
        t.start()
        return t

    def uri(self, key: str) -> str:
        return (f"s3://{BUCKET}/{key}?region=us-east-1&endpoint_override={self.endpoint}"
                "&scheme=http")

    def keys(self, prefix: str) -> list[str]:
        resp = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for o in resp.get("Contents", []))
