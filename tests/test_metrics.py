"""/metrics (llmosd --http): Prometheus text, read with prometheus-client's own parser, after
real work through gRPC, HTTP and the OpenAI endpoints."""
from __future__ import annotations

import pathlib
from typing import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc

from llmosd_process import LlmosdServer

USERLAND = pathlib.Path(__file__).resolve().parent.parent / "userland"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    srv = LlmosdServer(tmp_path_factory.mktemp("metrics") / "data", "--model", "tiny", "--http", "127.0.0.1:0",
                       "--cpus", "2", userland_root=USERLAND)
    srv.start()
    yield srv
    srv.stop()


def scrape(http: httpx.Client) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], parsed by prometheus-client."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    found = [v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())]
    return sum(found)


def test_metrics_count_what_happened(server: LlmosdServer) -> None:
    with server.channel() as channel, httpx.Client(base_url=server.http, timeout=60) as http:
        stub = kernel_pb2_grpc.KernelStub(channel)
        before = scrape(http)
        blocked = [stub.Spawn(pb.SpawnRequest(lua="sys.recv()")).pid for _ in range(3)]
        crashed = stub.Spawn(pb.SpawnRequest(lua="error('boom')")).pid
        stub.Wait(pb.WaitRequest(pid=crashed, timeout_ms=20_000))
        stub.Kill(pb.KillRequest(pid=blocked[0], reason="a reason of the caller's own"))
        stub.Wait(pb.WaitRequest(pid=blocked[0], timeout_ms=20_000))
        port = stub.OpenPort(pb.OpenPortRequest()).pid
        for i in range(4):
            stub.Send(pb.SendRequest(to=port, data=b"x" * 100))
        with pytest.raises(grpc.RpcError):
            stub.GetProcess(pb.GetProcessRequest(pid=10**9))
        r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 5,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        for pid in blocked[1:]:  # they reach BLOCKED in recv
            stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=200))
        after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "llmos_processes", state="BLOCKED", kind="LUA", namespace="default") >= 2
    assert value(after, "llmos_processes", kind="PORT") >= 1
    assert delta("llmos_process_spawns_total", kind="LUA") == 4
    assert delta("llmos_process_spawns_total", kind="PORT") == 1
    assert delta("llmos_process_exits_total", kind="LUA", state="CRASHED", reason="error") == 1
    assert delta("llmos_process_exits_total", kind="LUA", state="KILLED", reason="other") == 1
    assert value(after, "llmos_mailbox_messages") >= 4 and value(after, "llmos_mailbox_bytes") >= 400
    assert value(after, "llmos_mailbox_depth_bucket", le="+Inf") == value(after, "llmos_mailbox_depth_gcount") >= 3
    assert delta("llmos_syscalls_total", method="Spawn", code="OK") == 4
    assert delta("llmos_syscalls_total", method="GetProcess", code="NOT_FOUND") == 1
    assert delta("llmos_syscalls_total", method="Infer", code="OK") == 1  # the OpenAI endpoint's
    assert delta("llmos_syscall_seconds_count", method="Send") == 4
    assert value(after, "llmos_run_queue_length") >= 0 and value(after, "llmos_virtual_cpus") == 2
    assert delta("llmos_virtual_cpu_busy_seconds_total") > 0
    assert delta("llmos_store_commit_seconds_count") > 0
    assert delta("llmos_engine_generated_tokens_total") >= 1
    assert delta("llmos_engine_time_to_first_token_seconds_count") == 1
    assert delta("llmos_engine_inter_token_seconds_count") == delta("llmos_engine_generated_tokens_total") - 1
    assert value(after, "llmos_engine_tokens_per_second") > 0 and value(after, "llmos_engine_batch_size") >= 1
    blocks = {labels["state"]: v for labels, v in after["llmos_engine_kv_blocks"]}
    assert blocks["used"] >= 0 and blocks["free"] > 0
    for name in ("llmos_engine_running_sequences", "llmos_engine_waiting_sequences", "llmos_engine_preemptions_total",
                 "llmos_engine_prefix_cache_hits_total", "llmos_engine_prefix_cache_hit_tokens_total",
                 "process_resident_memory_bytes"):
        assert name in after, name


def test_prefix_cache_hits_are_counted(server: LlmosdServer) -> None:
    chat = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "the same long prompt " * 8}]}
    with httpx.Client(base_url=server.http, timeout=60) as http:
        before = scrape(http)
        for _ in range(2):
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
        after = scrape(http)
    assert value(after, "llmos_engine_prefix_cache_hits_total") > value(before, "llmos_engine_prefix_cache_hits_total")
    assert (value(after, "llmos_engine_prefix_cache_hit_tokens_total")
            >= value(before, "llmos_engine_prefix_cache_hit_tokens_total") + 16)
