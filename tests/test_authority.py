"""Authority (issue 14) through a real llmosd over real gRPC: tokens, namespaces, and the rules
between processes (docs/authority.md), for clients of every role, Lua processes and Python agents.

The isolation matrix over every syscall of the table is tests/test_authority_matrix.py; here are
the attacks of the issue, each a regression, tokens, TLS, the audit log and namespaces' quotas.

The world: namespace "alpha" (owner, reader and a second owner token), namespace "beta" (owner),
the admin token llmosd wrote on first start (namespace "default"), and clients without a token
(single-user mode: the owner of "default"). In alpha, an owner spawns `sibling` (a Lua process
that only waits), and a Python agent with a child, which applies an attack to a target when asked
and answers with the status (OK or a code name). In beta, `foreign`.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import grpc
import pytest

import llmos
from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmosd_process import LlmosdServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
USERLAND = ROOT / "userland"
WAIT_S = 30
FOREVER = "while true do sys.recv() end"

PY_ACTOR = """
import llmos
from llmos.userland import sys
child = sys.spawn(python="from llmos.userland import sys\\nsys.recv()")
ops = {
    # what a hostile agent can do with its own token on the agent socket, past llmos.userland:
    "read_log": lambda t: sys._k.read_log(t),
    "forge_from": lambda t: sys._k.send(t, "forged", sender=t),
    "lock_as": lambda t: sys._k.acquire(t, "lock-as-another", timeout=0),
    "spawn_under": lambda t: sys._k.spawn(lua="return 1", parent=t),
    "recv_from": lambda t: sys._k.recv(t, timeout=0),
    "rename": lambda t: sys._k.register(t, "taken-over"),
    "open_port": lambda t: sys._k.open_port(),
}
while True:
    m = sys.recv()
    if m.tag == "child":
        sys.send(m.sender, child, tag="child")
        continue
    if m.tag != "op":
        continue
    try:
        ops[m.body["op"]](m.body["target"])
        out = "OK"
    except llmos.LlmosError as e:
        out = e.code.name
    sys.send(m.sender, out, tag="r")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    s = LlmosdServer(tmp_path_factory.mktemp("authority") / "data", "--model", "none", "--cpus", "2",
                     userland_root=USERLAND)
    s.start()
    yield s
    s.stop(signal.SIGKILL)


def _code(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except llmos.LlmosError as e:
        return e.code.name
    return "OK"


class World:
    def __init__(self, server: LlmosdServer) -> None:
        target = server.target
        admin_token = (server.data_dir / "admin.token").read_text().strip()
        self.admin = llmos.Client(target, token=admin_token)
        tokens = {
            "owner": self.admin.create_token("alpha", "owner", "tests")[1],
            "owner2": self.admin.create_token("alpha", "owner", "a second owner")[1],
            "reader": self.admin.create_token("alpha", "reader", "tests")[1],
            "other": self.admin.create_token("beta", "owner", "tests")[1],
        }
        self.tokens = tokens
        self.c = {name: llmos.Client(target, token=tok) for name, tok in tokens.items()}
        self.c["admin"] = self.admin
        self.c["none"] = llmos.Client(target, token=None)
        owner = self.c["owner"]
        self.sibling = owner.spawn(lua=FOREVER)
        self.foreign = self.c["other"].spawn(lua=FOREVER)
        self.port = owner.open_port()
        self.agent = owner.spawn(python=PY_ACTOR)
        self.child = self.ask_child()

    def ask_child(self) -> int:
        owner = self.c["owner"]
        owner.send(self.agent, None, sender=self.port, tag="child")
        return owner.recv(self.port, tag="child", timeout=WAIT_S).body

    def ask(self, op: str, target: int) -> str:
        """What the agent got applying `op` to `target`: OK or a status code's name."""
        owner = self.c["owner"]
        owner.send(self.agent, {"op": op, "target": target}, sender=self.port, tag="op")
        return owner.recv(self.port, tag="r", timeout=WAIT_S).body

    def target(self, which: str) -> int:
        return {"self": self.agent, "child": self.child, "sibling": self.sibling, "foreign": self.foreign}[which]


@pytest.fixture(scope="module")
def world(server: LlmosdServer) -> Iterator[World]:
    w = World(server)
    yield w
    for client in w.c.values():
        client.close()


PYTHON_ATTACKS = [
    ("read_log", "sibling", "PERMISSION_DENIED"),  # another agent's log, hidden from it on disk
    ("read_log", "foreign", "NOT_FOUND"),
    ("forge_from", "sibling", "PERMISSION_DENIED"),
    ("lock_as", "sibling", "PERMISSION_DENIED"),
    ("spawn_under", "sibling", "PERMISSION_DENIED"),
    ("spawn_under", "foreign", "PERMISSION_DENIED"),  # acts_as comes first: only itself may be a parent
    ("recv_from", "sibling", "PERMISSION_DENIED"),
    ("rename", "child", "PERMISSION_DENIED"),  # Register names the caller itself (acts_as)
    ("open_port", "self", "PERMISSION_DENIED"),
]


@pytest.mark.parametrize("op,which,want", PYTHON_ATTACKS)
def test_a_python_agent_past_its_library(world: World, op: str, which: str, want: str) -> None:
    assert world.ask(op, world.target(which)) == want


def test_lists_and_events_show_only_the_namespace(world: World) -> None:
    alpha = {p.pid for p in world.c["owner"].ps()}
    beta = {p.pid for p in world.c["other"].ps()}
    assert world.sibling in alpha and world.foreign not in alpha
    assert world.foreign in beta and world.sibling not in beta
    assert {world.sibling, world.foreign} <= {p.pid for p in world.admin.ps()}
    assert {p.pid for p in world.c["reader"].ps()} >= {world.sibling}
    events = world.c["other"].events()
    next(events)  # subscribed
    world.c["owner"].spawn(lua="return 1")
    mine = world.c["other"].spawn(lua="return 2")
    first = next(events)
    events.close()
    assert first.process.pid == mine  # alpha's spawn went by unseen


# -- the attacks of the issue, each a regression ----------------------------------------------------
def test_recv_from_another_mailbox(world: World) -> None:
    assert _code(lambda: world.c["other"].recv(world.sibling, timeout=0)) == "NOT_FOUND"
    assert _code(lambda: world.c["owner"].recv(world.sibling, timeout=0)) == "PERMISSION_DENIED"


def test_a_port_belongs_to_its_opener_or_its_secret(world: World, server: LlmosdServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = kernel_pb2_grpc.KernelStub(channel)
        auth = lambda name: (("authorization", f"Bearer {world.tokens[name]}"),)  # noqa: E731
        opened = stub.OpenPort(pb.OpenPortRequest(), metadata=auth("owner"))
        assert opened.secret
        stub.Send(pb.SendRequest(to=opened.pid, tag="x"), metadata=auth("owner"))
        with pytest.raises(grpc.RpcError) as e:  # the same namespace's other owner token
            stub.Recv(pb.RecvRequest(pid=opened.pid, timeout_ms=0), metadata=auth("owner2"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            stub.Recv(pb.RecvRequest(pid=opened.pid, timeout_ms=0, port_secret="wrong"), metadata=auth("owner2"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        got = stub.Recv(pb.RecvRequest(pid=opened.pid, timeout_ms=0, port_secret=opened.secret), metadata=auth("owner2"))
        assert got.message.tag == "x"
        with pytest.raises(grpc.RpcError) as e:
            stub.Exit(pb.ExitRequest(pid=opened.pid), metadata=auth("owner2"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:  # another namespace: not even the secret shows it
            stub.Recv(pb.RecvRequest(pid=opened.pid, timeout_ms=0, port_secret=opened.secret), metadata=auth("other"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        stub.Exit(pb.ExitRequest(pid=opened.pid), metadata=auth("owner"))


def test_a_forged_from_is_refused(world: World) -> None:
    owner = world.c["owner"]
    assert _code(lambda: owner.send(world.sibling, "x", sender=world.sibling)) == "PERMISSION_DENIED"
    assert _code(lambda: owner.send(world.sibling, "x", sender=world.foreign)) == "NOT_FOUND"
    port2 = world.c["owner2"].open_port()
    assert _code(lambda: owner.send(world.sibling, "x", sender=port2)) == "PERMISSION_DENIED"
    assert _code(lambda: owner.send(world.sibling, "x", sender=world.port)) == "OK"


def test_names_are_per_namespace_and_not_taken_over(world: World) -> None:
    owner, other = world.c["owner"], world.c["other"]
    kv = owner.spawn(lua=FOREVER, name="kv")
    assert _code(lambda: other.register(kv, "stolen")) == "NOT_FOUND"  # renaming another's service
    their_kv = other.spawn(lua=FOREVER, name="kv")  # the same name in beta is beta's own
    assert their_kv != kv
    assert _code(lambda: owner.register(owner.spawn(lua=FOREVER), "kv")) == "ALREADY_EXISTS"
    port = owner.open_port()
    owner.send("kv", "to alpha's kv", sender=port)
    assert [p.pid for p in owner.ps(name="kv")] == [kv]
    assert [p.pid for p in other.ps(name="kv")] == [their_kv]
    assert _code(lambda: world.c["none"].send("kv", "x")) == "NOT_FOUND"


def test_files_and_locks_are_per_namespace(world: World) -> None:
    owner, other, reader = world.c["owner"], world.c["other"], world.c["reader"]
    owner.write_file("secret.txt", b"alpha's")
    assert reader.read_file("secret.txt") == b"alpha's"
    assert _code(lambda: other.read_file("secret.txt")) == "NOT_FOUND"
    assert _code(lambda: reader.write_file("x.txt", b"no")) == "PERMISSION_DENIED"
    a, b = owner.spawn(lua=FOREVER), other.spawn(lua=FOREVER)
    assert owner.acquire(a, "shared-name", timeout=0)
    assert other.acquire(b, "shared-name", timeout=0)  # a different lock: another namespace's
    # Within a namespace its processes share one tree and one set of locks (docs/authority.md).
    assert owner.acquire(owner.spawn(lua=FOREVER), "shared-name", timeout=0) is None  # a's, in alpha
    writer = owner.spawn(lua='sys.fs.write("by-writer.txt", "from a sibling") return true')
    assert owner.wait(writer, timeout=60).result is True
    sibling = owner.spawn(lua='return sys.fs.read("by-writer.txt")')
    assert owner.wait(sibling, timeout=60).result == "from a sibling"


def test_a_client_takes_no_leased_message_from_a_process(world: World) -> None:
    """A process's mailbox is its own, leased or not (the matrix's clients receive from ports)."""
    assert _code(lambda: world.c["owner"].recv(world.sibling, timeout=0, ack=True)) == "PERMISSION_DENIED"
    assert _code(lambda: world.c["other"].recv(world.sibling, timeout=0, ack=True)) == "NOT_FOUND"


def test_lua_spawns_in_its_own_namespace(world: World) -> None:
    pid = world.c["other"].spawn(lua="local c = sys.spawn{lua = 'return 1'}; return sys.info(c).namespace")
    info = world.c["other"].wait(pid, timeout=WAIT_S)
    assert info is not None and info.result == "beta" and info.namespace == "beta"


# -- tokens ---------------------------------------------------------------------------------------
def test_the_admin_token_file_and_hashed_tokens(world: World, server: LlmosdServer) -> None:
    path = server.data_dir / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    db = b"".join(p.read_bytes() for p in server.data_dir.glob("kernel.db*"))
    assert token.encode() not in db and world.tokens["owner"].encode() not in db
    listed = world.admin.list_tokens()
    assert {(t["namespace"], t["role"]) for t in listed} >= {("alpha", "owner"), ("alpha", "reader"), ("beta", "owner")}
    assert all("token" not in t for t in listed)


def test_only_admins_manage_tokens_and_revoked_tokens_stop(world: World, server: LlmosdServer) -> None:
    for role in ("owner", "reader", "none", "other"):
        assert _code(lambda: world.c[role].create_token("alpha", "admin")) == "PERMISSION_DENIED"
        assert _code(lambda: world.c[role].list_tokens()) == "PERMISSION_DENIED"
    assert _code(lambda: world.admin.create_token("alpha", "root")) == "INVALID_ARGUMENT"
    assert _code(lambda: world.admin.create_token("", "owner")) == "INVALID_ARGUMENT"
    token_id, token = world.admin.create_token("gamma", "owner", "short-lived")
    with llmos.Client(server.target, token=token) as gamma:
        assert gamma.ps() == []
        assert world.admin.revoke_token(token_id)
        assert _code(lambda: gamma.ps()) == "UNAUTHENTICATED"
    assert not world.admin.revoke_token(token_id)
    with llmos.Client(server.target, token="llmos_not-a-token") as bad:
        assert _code(lambda: bad.ps()) == "UNAUTHENTICATED"


def test_require_tokens_refuses_calls_without_one(tmp_path: pathlib.Path) -> None:
    s = LlmosdServer(tmp_path / "data", "--model", "none", "--require-tokens", userland_root=USERLAND)
    s.start()
    try:
        with llmos.Client(s.target, token=None) as anonymous:
            assert _code(lambda: anonymous.ps()) == "UNAUTHENTICATED"
        with llmos.Client(s.target, token=(s.data_dir / "admin.token").read_text().strip()) as admin:
            assert _code(lambda: admin.ps()) == "OK"
    finally:
        s.stop(signal.SIGKILL)


def test_a_network_listener_without_tls_needs_insecure(tmp_path: pathlib.Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "llmosd", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path),
                          "--model", "none"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0 and "--insecure" in out.stderr


def test_the_docs_table_is_the_code_table() -> None:
    from llmosd.api.table import RULES, TABLE

    doc = (ROOT / "docs" / "authority.md").read_text()
    rows = {tuple(c.strip().strip("`") for c in line.strip("|").split("|"))
            for line in doc.splitlines() if line.startswith("| `")}
    want = {(s.name, s.rpc or "", s.rule, "yes" if s.reader else "") for s in TABLE}
    assert rows == want
    for rule, text in RULES.items():
        assert f"`{rule}`: {text}" in doc


# -- namespaces: use and quotas -------------------------------------------------------------------
def test_namespace_quota_of_live_processes(tmp_path: pathlib.Path) -> None:
    s = LlmosdServer(tmp_path / "data", "--model", "none", "--namespace-processes", "3", userland_root=USERLAND)
    s.start()
    try:
        with llmos.Client(s.target, token=(s.data_dir / "admin.token").read_text().strip()) as admin, \
                llmos.Client(s.target, token=None) as default:
            _, token = admin.create_token("small", "owner")
            with llmos.Client(s.target, token=token) as small:
                pids = [small.spawn(lua=FOREVER) for _ in range(2)]
                port = small.open_port()
                assert _code(lambda: small.spawn(lua=FOREVER)) == "RESOURCE_EXHAUSTED"
                assert _code(lambda: small.open_port()) == "RESOURCE_EXHAUSTED"
                # a process of the namespace is refused too, and nothing else is killed for it
                small.kill(pids[1])
                spawner = small.spawn(lua="local ok, err = pcall(sys.spawn, {lua = 'return 1'}); return tostring(err)")
                info = small.wait(spawner, timeout=WAIT_S)
                assert info is not None and "--namespace-processes" in str(info.result), info
                assert default.spawn(lua="return 1")  # another namespace has its own count
                use = small.get_namespace()
                assert (use["name"], use["live_processes"], use["max_live_processes"], use["tokens"]) == \
                    ("small", 2, 3, 1)
                assert {p.pid for p in small.ps()} == {pids[0], port}
                assert _code(lambda: small.get_namespace("default")) == "NOT_FOUND"
                assert admin.get_namespace("small")["live_processes"] == 2
                small.send(port, "x" * 1000)
                use = small.get_namespace()
                assert use["mailbox_bytes"] >= 1000 and use["memory_bytes"] > 0
    finally:
        s.stop(signal.SIGKILL)


def test_the_cli_manages_tokens(server: LlmosdServer, world: World, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from llmos.cli import main

    monkeypatch.setenv("LLMOS_TOKEN", (server.data_dir / "admin.token").read_text().strip())
    assert main(["--server", server.target, "token", "create", "delta", "reader", "--label", "cli"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert main(["--server", server.target, "token", "list"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"id": made["id"], "namespace": "delta", "role": "reader", "label": "cli"}.items() <= \
        next(t for t in listed if t["id"] == made["id"]).items()
    monkeypatch.setenv("LLMOS_TOKEN", made["token"])
    assert main(["--server", server.target, "ns"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "delta"
    assert main(["--server", server.target, "token", "list"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.setenv("LLMOS_TOKEN", (server.data_dir / "admin.token").read_text().strip())
    assert main(["--server", server.target, "token", "revoke", made["id"]]) == 0
    assert main(["--server", server.target, "token", "revoke", made["id"]]) == 1


def test_the_unix_listener_is_the_server_users_only(tmp_path: pathlib.Path) -> None:
    sock = tmp_path / "llmos.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "llmosd", "--listen", f"unix:{sock}", "--data-dir",
                             str(tmp_path / "data"), "--model", "none"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on" in line:
                break
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    finally:
        proc.kill()
        proc.wait()


# -- TLS and mutual TLS: certificates made here, at test time -----------------------------------------
def _certificates(where: pathlib.Path) -> dict[str, pathlib.Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, pathlib.Path] = {}

    def make(name: str, cn: str, issuer: tuple | None, ca: bool = False, san: bool = False) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
        (where / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (where / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        out[name], out[f"{name}-key"] = where / f"{name}.pem", where / f"{name}.key"
        return cert, key

    ca = make("ca", "llmos test CA", None, ca=True)
    make("server", "localhost", ca, san=True)
    make("alice", "owner@alpha", ca)
    make("bad", "superuser", ca)
    return out


def test_tls_and_mutual_tls(tmp_path: pathlib.Path) -> None:
    certs = _certificates(tmp_path)
    s = LlmosdServer(tmp_path / "data", "--model", "none", "--tls-cert", str(certs["server"]), "--tls-key",
                     str(certs["server-key"]), "--tls-client-ca", str(certs["ca"]), userland_root=USERLAND)
    s.start()
    try:
        def tls(client: str | None) -> grpc.ChannelCredentials:
            return llmos.client.channel_credentials(
                str(certs["ca"]), str(certs[client]) if client else None, str(certs[f"{client}-key"]) if client else None)

        admin_token = (s.data_dir / "admin.token").read_text().strip()
        with llmos.Client(s.target, tls=tls("alice")) as alice:  # no token: the certificate's owner@alpha
            pid = alice.spawn(lua=FOREVER)
            assert alice.get(pid).namespace == "alpha"
            assert alice.get_namespace()["name"] == "alpha"
        with llmos.Client(s.target, tls=tls("alice"), token=admin_token) as admin:  # a token wins
            assert admin.get_namespace()["name"] == "default" and pid in {p.pid for p in admin.ps()}
        with llmos.Client(s.target, tls=tls("bad")) as bad:
            assert _code(lambda: bad.ps()) == "UNAUTHENTICATED"
        with llmos.Client(s.target, tls=tls(None), rpc_timeout=5) as no_certificate:
            assert _code(lambda: no_certificate.ps()) == "UNAVAILABLE"  # the handshake fails
        with llmos.Client(s.target, token=admin_token, rpc_timeout=5) as plaintext:
            assert _code(lambda: plaintext.ps()) == "UNAVAILABLE"
    finally:
        s.stop(signal.SIGKILL)


def test_tls_without_client_certificates(tmp_path: pathlib.Path) -> None:
    certs = _certificates(tmp_path)
    s = LlmosdServer(tmp_path / "data", "--model", "none", "--tls-cert", str(certs["server"]), "--tls-key",
                     str(certs["server-key"]), userland_root=USERLAND)
    s.start()  # on 127.0.0.1: single-user, over TLS
    try:
        with llmos.Client(s.target, tls=llmos.client.channel_credentials(str(certs["ca"]))) as k:
            assert k.get_namespace()["name"] == "default"
    finally:
        s.stop(signal.SIGKILL)


def test_the_audit_log(world: World, server: LlmosdServer, capsys: pytest.CaptureFixture,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    owner = world.c["owner"]
    pid = owner.spawn(lua=FOREVER)
    owner.kill(pid)
    assert _code(lambda: world.c["other"].kill(pid)) == "NOT_FOUND"
    world.c["reader"].get(pid)  # reads are not recorded
    assert _code(lambda: owner.read_audit()) == "PERMISSION_DENIED"
    entries = []
    for _ in range(100):  # the log is written behind, in batches
        entries = world.admin.read_audit(limit=10_000)
        if any(e["method"] == "Kill" and e["outcome"] == "NOT_FOUND" for e in entries):
            break
        time.sleep(0.05)
    mine = [(e["namespace"], e["method"], e["target"], e["outcome"]) for e in entries if e["target"] == f"pid={pid}"]
    assert ("alpha", "Kill", f"pid={pid}", "OK") in mine and ("beta", "Kill", f"pid={pid}", "NOT_FOUND") in mine
    assert not any(e["method"] == "GetProcess" for e in entries)
    assert entries == sorted(entries, key=lambda e: -e["id"])
    owner_id = next(t["id"] for t in world.admin.list_tokens() if t["namespace"] == "alpha" and t["label"] == "tests"
                    and t["role"] == "owner")
    assert any(e["who"] == f"owner {owner_id}" for e in entries)
    assert _code(lambda: world.admin.read_audit(limit=10_001)) == "INVALID_ARGUMENT"
    from llmos.cli import main

    monkeypatch.setenv("LLMOS_TOKEN", (server.data_dir / "admin.token").read_text().strip())
    assert main(["--server", server.target, "audit", "--limit", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_the_audit_log_is_bounded(tmp_path: pathlib.Path) -> None:
    s = LlmosdServer(tmp_path / "data", "--model", "none", "--audit-rows", "5", userland_root=USERLAND)
    s.start()
    try:
        with llmos.Client(s.target, token=(s.data_dir / "admin.token").read_text().strip()) as admin:
            for i in range(20):
                admin.spawn(lua="return 1")
            ids = [e["id"] for e in admin.read_audit(limit=100)]
            assert len(ids) <= 5 + 1 and max(ids) >= 20
    finally:
        s.stop(signal.SIGKILL)


def test_audit_batches_of_any_size_keep_every_row_once(tmp_path: pathlib.Path) -> None:
    """The audit log writes a batch in statements padded to a power of two rows (kernel/store.py
    padded_rows): every row is there once, in order, with ids one after the other, and no padding."""
    from llmosd.api.audit import AuditLog
    from llmosd.api.authority import Caller

    log = AuditLog(str(tmp_path), max_rows=1000)
    caller, n = Caller("default", "client", 0, "key"), 0
    for size in (1, 3, 130, 7):
        for i in range(n, n + size):
            log.record(caller, "Send", f"to={i}", "OK")
        n += size
        log._flush()
    rows = log.read(1000)
    assert [row[0] for row in rows] == list(range(n, 0, -1))
    assert [row[5] for row in rows] == [f"to={i}" for i in range(n - 1, -1, -1)]
    assert {row[3:5] + row[6:] for row in rows} == {("client key", "Send", "OK")}
    log.close()


def test_audit_rows_of_a_server_before_audit_db_are_kept(tmp_path: pathlib.Path) -> None:
    """The audit log moved from kernel.db to audit.db (its batches held up the store's writes):
    the rows an older server wrote come along, and kernel.db keeps no audit table."""
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    old = sqlite3.connect(data / "kernel.db")
    old.executescript("CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, "
                      "namespace TEXT NOT NULL, who TEXT NOT NULL, method TEXT NOT NULL, target TEXT NOT NULL, "
                      "outcome TEXT NOT NULL);"
                      "INSERT INTO audit (at_ms, namespace, who, method, target, outcome) "
                      "VALUES (1, 'default', 'owner (no token)', 'Kill', 'pid=7', 'OK');")
    old.commit()
    old.close()
    s = LlmosdServer(data, "--model", "none", userland_root=USERLAND)
    s.start()
    try:
        with llmos.Client(s.target, token=(s.data_dir / "admin.token").read_text().strip()) as admin:
            admin.spawn(lua="return 1")
            entries = admin.read_audit(limit=100)
            assert [(e["method"], e["target"]) for e in entries[-1:]] == [("Kill", "pid=7")]
            assert entries[0]["method"] == "Spawn"
    finally:
        s.stop(signal.SIGKILL)
    tables = sqlite3.connect(data / "kernel.db").execute("SELECT name FROM sqlite_master WHERE type='table'")
    assert "audit" not in {name for (name,) in tables}


def test_only_a_ports_opener_closes_it(world: World) -> None:
    port = world.c["owner"].open_port()
    assert _code(lambda: world.c["owner2"].kill(port)) == "PERMISSION_DENIED"
    assert _code(lambda: world.c["owner2"].exit(port)) == "PERMISSION_DENIED"
    assert _code(lambda: world.c["other"].kill(port)) == "NOT_FOUND"
    assert world.c["owner"].kill(port)
