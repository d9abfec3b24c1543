"""Start an llmosd server as a subprocess: for tests, benchmarks and tools."""
from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import grpc


class LlmosdServer:
    """An llmosd subprocess on a free loopback port; restartable on the same data directory."""

    def __init__(self, data_dir: pathlib.Path, *extra: str, userland_root: pathlib.Path | None = None) -> None:
        self.data_dir = pathlib.Path(data_dir)
        self.extra = list(extra)
        self.userland_root = userland_root
        self.proc: subprocess.Popen | None = None
        self.target = ""
        self.http = ""  # "http://HOST:PORT" when started with --http
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-llmosd.log"

    def start(self, timeout: float = 60.0) -> str:
        """Start the server and return its target ("127.0.0.1:PORT") once it listens."""
        args = [sys.executable, "-u", "-m", "llmosd", "--listen", "127.0.0.1:0", "--data-dir", str(self.data_dir)]
        if self.userland_root is not None:
            args += ["--userland-root", str(self.userland_root)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args + self.extra, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        found: list[str] = []

        def read_until_listening() -> None:
            for raw in self.proc.stdout:  # type: ignore[union-attr]
                line = raw.decode(errors="replace")
                http = re.search(r"http on (\S+)", line)  # printed before "listening on"
                if http:
                    self.http = f"http://{http.group(1)}"
                match = re.search(r"listening on (\S+)", line)
                if match and not found:
                    found.append(match.group(1))
                # keep draining so the server never blocks on a full pipe

        threading.Thread(target=read_until_listening, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmosd exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"llmosd did not start in {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.02)
        self.target = found[0]
        return self.target

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)
