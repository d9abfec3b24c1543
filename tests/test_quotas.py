"""Per-namespace quotas (issue 14) through a real llmosd over real gRPC: memory, mailbox and KV
bytes bound the sum of a namespace's live processes' limits (a new process gets at most what is
left, so that nothing running is killed for its namespace), inference tokens in total and per
minute; each reported with its use by GetNamespace, set by an admin (SetNamespace) or by the
server's --namespace-* defaults; going over is RESOURCE_EXHAUSTED."""
from __future__ import annotations

import signal
import time
from typing import Iterator

import grpc
import pytest

import llmos
from llmosd_process import LlmosdServer
from statuses import code_of

MIB = 1 << 20
KV_QUOTA = 64 << 10
FOREVER = "while true do sys.recv() end"


def _settles_blocked(client: llmos.Client, pid: int) -> bool:
    """`pid` reaches its receive and waits there (a process just spawned may still be starting, on a
    busy machine): alive, not ended for its namespace's quota."""
    deadline = time.monotonic() + 30
    while (state := client.get(pid).state.name) in ("RUNNABLE", "RUNNING") and time.monotonic() < deadline:
        time.sleep(0.01)
    return state == "BLOCKED"


def _admin(server: LlmosdServer) -> llmos.Client:
    return llmos.Client(server.target, token=(server.data_dir / "admin.token").read_text().strip())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    s = LlmosdServer(tmp_path_factory.mktemp("quotas") / "data", "--model", "tiny", "--cpus", "2",
                     "--namespace-kv-bytes", str(KV_QUOTA))
    s.start()
    yield s
    s.stop(signal.SIGKILL)


def test_memory_quota_bounds_the_sum_of_limits(server: LlmosdServer) -> None:
    with _admin(server) as admin:
        with llmos.Client(server.target, token=admin.create_token("mem", "owner")[1]) as mem, \
                llmos.Client(server.target, token=admin.create_token("roomy", "owner")[1]) as roomy:
            admin.set_namespace("mem", memory_bytes=100 * MIB)
            first = mem.spawn(lua=FOREVER)  # the server's default limit, 64 MiB
            assert mem.get(first).limits["memory_bytes"] == 64 * MIB
            assert code_of(lambda: mem.spawn(lua=FOREVER, limits={"memory_bytes": 40 * MIB})) \
                == grpc.StatusCode.RESOURCE_EXHAUSTED
            second = mem.spawn(lua=FOREVER)  # the default, lowered to what is left
            assert mem.get(second).limits["memory_bytes"] == 36 * MIB
            assert code_of(lambda: mem.spawn(lua=FOREVER)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            use = mem.get_namespace()
            assert use["quotas"]["memory_bytes"] == 100 * MIB
            assert use["reserved"]["memory_bytes"] == 100 * MIB
            assert 0 < use["use"]["memory_bytes"] <= 100 * MIB
            assert all(_settles_blocked(mem, pid) for pid in (first, second))
            assert roomy.spawn(lua=FOREVER)  # another namespace has its own
            mem.kill(second)
            assert mem.wait(second, timeout=30) is not None
            third = mem.spawn(lua=FOREVER, limits={"memory_bytes": 30 * MIB})  # room again
            assert mem.get_namespace()["reserved"]["memory_bytes"] == 94 * MIB
            admin.set_namespace("mem", memory_bytes=0)  # no quota: the server's default limits again
            assert mem.get(mem.spawn(lua=FOREVER)).limits["memory_bytes"] == 64 * MIB
            for pid in (first, third):
                assert _settles_blocked(mem, pid)


def test_a_child_spawned_over_the_quota_is_refused_in_lua(server: LlmosdServer) -> None:
    with _admin(server) as admin:
        with llmos.Client(server.target, token=admin.create_token("nest", "owner")[1]) as nest:
            admin.set_namespace("nest", memory_bytes=64 * MIB)
            parent = nest.spawn(lua="local ok, err = pcall(sys.spawn, {lua = 'return 1'}); return tostring(err)",
                                limits={"memory_bytes": 64 * MIB})
            info = nest.wait(parent, timeout=30)
            assert info is not None and "memory_bytes quota" in str(info.result), info


def test_mailbox_quota_covers_ports(server: LlmosdServer) -> None:
    with _admin(server) as admin:
        with llmos.Client(server.target, token=admin.create_token("mail", "owner")[1]) as mail:
            admin.set_namespace("mail", mailbox_bytes=64 * MIB + 2000)
            mail.open_port()
            small = mail.open_port()  # what is left: 2000 bytes
            mail.send(small, "x" * 500)
            assert code_of(lambda: mail.send(small, "x" * 2000)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert code_of(lambda: mail.open_port()) == grpc.StatusCode.RESOURCE_EXHAUSTED
            use = mail.get_namespace()
            assert use["reserved"]["mailbox_bytes"] == 64 * MIB + 2000
            assert 500 <= use["use"]["mailbox_bytes"] <= 2000


def test_kv_quota_from_the_server_default(server: LlmosdServer) -> None:
    """--namespace-kv-bytes: past it, a new context is refused until one is dropped."""
    with _admin(server) as admin:
        with llmos.Client(server.target, token=admin.create_token("kv", "owner")[1]) as kv:
            assert kv.get_namespace()["quotas"]["kv_bytes"] == KV_QUOTA
            owner = kv.open_port()
            chat = [{"role": "user", "content": "a question that takes some room " * 4}]
            contexts = []
            while kv.get_namespace()["use"]["kv_bytes"] < KV_QUOTA:
                contexts.append(kv.create_context(owner, chat).context_id)
                assert len(contexts) < 100, kv.get_namespace()
            assert code_of(lambda: kv.create_context(owner, chat)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert code_of(lambda: kv.fork_context(owner, contexts[0])) == grpc.StatusCode.RESOURCE_EXHAUSTED
            kv.drop_context(owner, contexts[0])
            if kv.get_namespace()["use"]["kv_bytes"] < KV_QUOTA:
                assert kv.create_context(owner, chat).context_id


def test_token_quotas_total_and_per_minute(server: LlmosdServer) -> None:
    with _admin(server) as admin:
        with llmos.Client(server.target, token=admin.create_token("talk", "owner")[1]) as talk, \
                llmos.Client(server.target, token=admin.create_token("other", "owner")[1]) as other:
            admin.set_namespace("talk", tokens_per_minute=40)
            first = talk.infer(prompt="hello", max_tokens=100, temperature=0)
            used = first.usage["prompt_tokens"] + first.usage["completion_tokens"]
            assert used <= 40  # max_tokens was cut to the namespace's minute
            while talk.get_namespace()["use"]["tokens_per_minute"] < 40:
                talk.infer(prompt="hello", max_tokens=100, temperature=0)
            assert code_of(lambda: talk.infer(prompt="hello", max_tokens=5)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert other.infer(prompt="hello", max_tokens=5).text is not None  # its own quota
            use = talk.get_namespace()
            assert use["quotas"]["tokens_per_minute"] == 40 and use["use"]["tokens"] >= 40
            # a total: already used up
            admin.set_namespace("talk", tokens_per_minute=0, tokens=use["use"]["tokens"])
            assert code_of(lambda: talk.infer(prompt="hello", max_tokens=5)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            admin.set_namespace("talk", tokens=use["use"]["tokens"] + 1000)
            assert talk.infer(prompt="hello", max_tokens=5).text is not None
