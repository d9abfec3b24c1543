"""The Infer syscall over real gRPC and from Lua, on the real engine."""
from __future__ import annotations

import math
import pathlib
import sys
import threading
import time
from typing import Any, Iterator

import grpc
import pytest

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value
from llmosd_process import LlmosdServer
from statuses import code_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
USERLAND = ROOT / "userland"


sys.path.insert(0, str(ROOT / "tools"))
from make_checkpoint import write_checkpoint  # noqa: E402


# Fewer tokens than the engine's round-robin quantum (256): a request of this length, once running,
# keeps the engine to itself at --max-batch 1 unless a more important one comes.
LONG_TOKENS = 200


def infer(stub: Any, **kw: Any) -> list[pb.InferChunk]:
    sampling = kw.pop("sampling", {})
    return list(stub.Infer(pb.InferRequest(sampling=pb.SamplingParams(**sampling), **kw), timeout=120))


def run_lua(stub: Any, source: str, args: Any = None, **kw: Any) -> pb.ProcessInfo:
    pid = stub.Spawn(pb.SpawnRequest(lua=source, args=to_value(args), **kw)).pid
    return stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=120_000)).process


@pytest.fixture(scope="module")
def checkpoint_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[pathlib.Path, Any]]:
    """A server running a small Llama checkpoint written for the test."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", shape="tiny", arch="llama", seed=11)
    server = LlmosdServer(tmp_path_factory.mktemp("llmosd") / "data", "--model", str(ckpt), "--cpus", "2",
                          userland_root=USERLAND)
    server.start()
    with server.channel() as channel:
        yield ckpt, kernel_pb2_grpc.KernelStub(channel)
    server.stop()


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server whose engine decodes one sequence per step (--max-batch 1): a request either runs
    alone or waits, so the order in which the engine serves requests shows in when they end."""
    server = LlmosdServer(tmp_path_factory.mktemp("llmosd") / "data", "--cpus", "2", "--max-batch", "1",
                          userland_root=USERLAND)
    server.start()
    with server.channel() as channel:
        yield kernel_pb2_grpc.KernelStub(channel)
    server.stop()


@pytest.fixture(scope="module")
def long_prompt(llmosd: LlmosdServer) -> str:
    """A prompt whose greedy continuation by the built-in tiny model runs LONG_TOKENS tokens without an
    end-of-sequence token (its text is gibberish, but greedy decoding of fixed weights is the same every
    time), found by trying a few: tests that need a request to keep the engine busy use it."""
    with llmosd.channel() as channel:
        stub = kernel_pb2_grpc.KernelStub(channel)
        for candidate in ("urgent", "busy work", "a long answer", "go on", "keep talking"):
            [final] = infer(stub, prompt=candidate, sampling={"max_tokens": LONG_TOKENS, "temperature": 0.0})
            if final.finish_reason == "length":
                return candidate
    raise AssertionError(f"no candidate prompt ran {LONG_TOKENS} tokens without an end-of-sequence token")


def test_greedy_tokens_match_transformers_through_grpc(checkpoint_server: tuple[pathlib.Path, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    ckpt, stub = checkpoint_server
    prompt = "the quick brown fox jumps over the lazy dog"
    [final] = infer(stub, prompt=prompt, sampling={"max_tokens": 32, "temperature": 0.0})
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert final.usage.prompt_tokens == len(ids)
    assert list(final.token_ids) == expected
    # transformers stops after an end-of-sequence token, as the engine does ("stop"); else at 32 ("length")
    assert final.finish_reason == ("stop" if expected[-1] == tok.eos_token_id else "length")


def test_streamed_and_whole_answers_agree(stub: Any) -> None:
    params = {"max_tokens": 24, "temperature": 0.9, "seed": 7}
    chunks = infer(stub, prompt="hello agents", sampling=params, stream=True)
    [whole] = infer(stub, prompt="hello agents", sampling=params)
    assert chunks[-1].finish_reason == whole.finish_reason == "length"
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert "".join(c.text for c in chunks) == whole.text
    assert whole.usage.completion_tokens == 24


def test_seeded_sampling_is_the_same_in_any_company(stub: Any) -> None:
    params = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    [alone] = infer(stub, prompt="same seed", sampling=params)
    company = [threading.Thread(target=infer, args=(stub,), kwargs={"prompt": f"other {i}" * (i + 1),
               "sampling": {"max_tokens": 20, "temperature": 1.0}}) for i in range(6)]
    for t in company:
        t.start()
    [crowded] = infer(stub, prompt="same seed", sampling=params)
    for t in company:
        t.join()
    assert list(crowded.token_ids) == list(alone.token_ids)


def fresh_piece(text: str, start: int) -> str:
    """Two characters of `text` found first at or after `start`, with no U+FFFD (bytes that are not UTF-8
    yet, which a streaming decoder may hold back)."""
    for i in range(start, len(text) - 1):
        piece = text[i:i + 2]
        if "\ufffd" not in piece and text.find(piece) == i:
            return piece
    raise AssertionError(f"no two-character stop string to take from {text[start:]!r}")


def test_chat_messages_and_stop_strings(stub: Any) -> None:
    chat = [pb.ChatMessage(role="system", content="be brief"), pb.ChatMessage(role="user", content="hi")]
    greedy = {"max_tokens": 48, "temperature": 0.0}
    [whole] = infer(stub, messages=chat, sampling=greedy)
    assert whole.usage.prompt_tokens > len("be brief") + len("hi")  # the chat template wraps them
    assert whole.finish_reason == "length", "the greedy continuation must run past the stop strings below"
    text = whole.text
    # Stop strings taken from the (gibberish, but greedy hence fixed) text itself: the earliest starts a few
    # characters in, another one later.
    early = fresh_piece(text, 3)
    cut = text.find(early)
    late = fresh_piece(text, cut + len(early))
    for stops in ([early], [late, early], ["\u2603 not in it", early]):  # the earliest match wins
        [stopped] = infer(stub, messages=chat, sampling={**greedy, "stop": stops})
        assert stopped.finish_reason == "stop", stops
        assert stopped.text == text[:cut], stops  # the text ends before the stop string, without it
        assert 0 < stopped.usage.completion_tokens < whole.usage.completion_tokens
        assert list(stopped.token_ids) == list(whole.token_ids)[:stopped.usage.completion_tokens]
    # streamed, the chunks hold the same text: what was held back for a possible match is never sent
    chunks = infer(stub, messages=chat, sampling={**greedy, "stop": [early]}, stream=True)
    assert "".join(c.text for c in chunks) == text[:cut] and chunks[-1].finish_reason == "stop"
    # a stop string that never occurs changes nothing
    [unstopped] = infer(stub, messages=chat, sampling={**greedy, "stop": ["\u2603 not in it"]})
    assert (unstopped.text, unstopped.finish_reason) == (text, "length")


@pytest.mark.parametrize("request_kw", [
    {"prompt": ""},
    {"prompt": "x", "sampling": {"temperature": math.nan}},
    {"prompt": "x", "sampling": {"temperature": -1.0}},
    {"prompt": "x", "sampling": {"top_p": 1.5}},
    {"prompt": "x", "sampling": {"max_tokens": 10**8}},
    {"messages": [pb.ChatMessage(role="wizard", content="x")]},
    {"prompt": "x", "messages": [pb.ChatMessage(role="user", content="x")]},
    {"prompt": "x", "sampling": {"stop": ["s"] * 17}},
    {"prompt": "x", "sampling": {"stop": ["s" * 1025]}},
], ids=["empty", "nan temperature", "negative temperature", "top_p > 1", "beyond context", "unknown role",
        "prompt and messages", "17 stop strings", "a stop string of 1025 characters"])
def test_bad_requests_are_invalid_arguments(stub: Any, request_kw: dict) -> None:
    assert code_of(lambda: infer(stub, **dict(request_kw))) == grpc.StatusCode.INVALID_ARGUMENT
    [ok] = infer(stub, prompt="still serving", sampling={"max_tokens": 2})
    assert ok.usage.completion_tokens == 2


def test_stop_strings_are_bounded_alike_from_lua(stub: Any) -> None:
    info = run_lua(stub, """
        local errors = {}
        for i, stop in ipairs{{("s"):rep(1025)}, {"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n",
                                                  "o", "p", "q"}} do
          errors[i] = select(2, pcall(sys.infer, {prompt = "x", max_tokens = 2, stop = stop}))
        end
        local r = sys.infer{prompt = "x", max_tokens = 2, stop = {("s"):rep(1024), "a", "b", "c", "d", "e", "f", "g",
                                                                   "h", "i", "j", "k", "l", "m", "n", "o"}}
        return {errors, r.usage.completion_tokens}
    """)
    assert info.state == pb.EXITED, info.error
    (long_one, many), tokens = from_value(info.result)
    assert "a stop string of 1025 characters; at most 1024" in long_one and "17 stop strings; at most 16" in many
    assert tokens <= 2


# llguidance refuses this schema (its lexer is over its size limit), after seconds of work.
HUGE_ENUM_LUA = "local e = {} for i = 1, 200000 do e[i] = 'v' .. i end"


@pytest.mark.parametrize("door", ["grpc", "lua"])
def test_a_huge_constraint_holds_up_nobody(stub: Any, door: str) -> None:
    """A request's constraint is compiled (and its prompt tokenized) off the server's event loop and
    off the kernel lock. Compiled on them, this one stopped every other call for the seconds it took
    (ListProcesses waited 3.9 s); now calls are answered meanwhile."""
    outcome: list[str] = []
    if door == "grpc":
        request = pb.InferRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=2),
                                  json_schema=to_value({"enum": [f"v{i}" for i in range(200_000)]}))

        def call() -> None:
            try:
                list(stub.Infer(request, timeout=120))
                outcome.append("accepted")
            except grpc.RpcError as e:
                outcome.append(f"{e.code().name}: {e.details()}")
    else:
        def call() -> None:
            info = run_lua(stub, HUGE_ENUM_LUA + """
                local ok, err = pcall(sys.infer, {prompt = "x", max_tokens = 2, json_schema = {enum = e}})
                return ok and "accepted" or "INVALID_ARGUMENT: " .. err""")
            outcome.append(from_value(info.result))
    caller = threading.Thread(target=call)
    began = time.monotonic()
    caller.start()
    waits: list[float] = []  # of ListProcesses (it takes the kernel lock), one after the other
    while caller.is_alive():
        asked = time.monotonic()
        stub.ListProcesses(pb.ListProcessesRequest(page_size=1), timeout=120)
        waits.append(time.monotonic() - asked)
    caller.join()
    whole = time.monotonic() - began
    assert outcome[0].startswith("INVALID_ARGUMENT") and "too big" in outcome[0], outcome
    # Relative, not absolute: no call waited for most of the request (the compile is most of it).
    assert len(waits) >= 20 and max(waits) < whole / 2, \
        f"{len(waits)} calls answered in {whole:.2f} s, the longest wait {max(waits):.2f} s"


def test_token_limit_refuses_the_next_request(stub: Any) -> None:
    pid = stub.Spawn(pb.SpawnRequest(lua="sys.recv{}", limits=pb.Limits(tokens=20))).pid
    [first] = infer(stub, pid=pid, prompt="count me", sampling={"max_tokens": 16})
    used = first.usage.prompt_tokens + first.usage.completion_tokens
    assert used >= 20
    assert stub.GetProcess(pb.GetProcessRequest(pid=pid)).usage.tokens == used
    assert code_of(lambda: infer(stub, pid=pid, prompt="again", sampling={"max_tokens": 4})) \
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub.Kill(pb.KillRequest(pid=pid))


def test_sys_infer_from_lua(stub: Any) -> None:
    info = run_lua(stub, """
        local r = sys.infer{prompt = "hello", max_tokens = 5, seed = 3, temperature = 0.7}
        local ok, err = pcall(sys.infer, {prompt = "x", nonsense = true})
        local chat = sys.infer{messages = {{role = "user", content = "hi"}}, max_tokens = 3}
        return {r.finish_reason, r.usage, type(r.text), err, chat.usage, sys.info().usage.tokens}
    """)
    assert info.state == pb.EXITED, info.error
    reason, usage, text_type, err, chat_usage, tokens = from_value(info.result)
    assert (reason, usage["completion_tokens"], text_type, chat_usage["completion_tokens"]) == ("length", 5, "string", 3)
    assert "nonsense" in err
    # both requests are charged to the process, prompts included, before sys.infer returns; the refused one is not
    assert tokens == usage["prompt_tokens"] + 5 + chat_usage["prompt_tokens"] + 3


def wait_blocked_in(stub: Any, pid: int, syscall: str, timeout_s: float = 30.0) -> None:
    """Poll until `pid` is BLOCKED in `syscall`; fail if it ends first or never blocks there."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = stub.GetProcess(pb.GetProcessRequest(pid=pid))
        assert info.state not in (pb.EXITED, pb.KILLED, pb.CRASHED), \
            f"pid {pid} ended {pb.ProcessState.Name(info.state)} before it was seen blocked in {syscall}"
        if info.state == pb.BLOCKED and info.blocked_on == syscall:
            return
        assert time.monotonic() < deadline, f"pid {pid} was not seen blocked in {syscall} within {timeout_s} s"
        time.sleep(0.005)


def test_killing_a_process_blocked_in_infer(stub: Any, long_prompt: str) -> None:
    # ten times the tokens the prompt is known to run without stopping: it is still generating when killed
    pid = stub.Spawn(pb.SpawnRequest(lua="return sys.infer{prompt = args, max_tokens = 2000, temperature = 0}",
                                     args=to_value(long_prompt))).pid
    wait_blocked_in(stub, pid, "infer")
    assert not stub.Kill(pb.KillRequest(pid=pid, reason="enough")).already_ended
    ended = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=30_000))
    assert not ended.timed_out, "the killed process did not end"
    assert (ended.process.state, ended.process.exit_reason) == (pb.KILLED, "enough")
    [ok] = infer(stub, prompt="after the kill", sampling={"max_tokens": 3})
    assert ok.usage.completion_tokens == 3


def idle_caller(stub: Any, priority: int) -> int:
    """A live process, spawned at `priority` (its ceiling), to charge infer requests to."""
    return stub.Spawn(pb.SpawnRequest(lua="sys.recv{tag = 'never'}", priority=priority)).pid


def tokens_charged(stub: Any, pid: int) -> int:
    return stub.GetProcess(pb.GetProcessRequest(pid=pid)).usage.tokens


@pytest.mark.parametrize("direction", ["raised", "lowered"])
def test_infer_priority_orders_the_engine_end_to_end(one_at_a_time: Any, long_prompt: str, direction: str) -> None:
    """InferRequest.priority, not the caller's priority, places a request in the engine's order.

    A long request of priority 0 is running alone (one sequence per step). A second request comes from a
    caller whose own priority would put it on the other side of the first: "raised" sends priority 10
    from a caller at 0 (spawned at 10, so 10 is within its ceiling), which must overtake the running one;
    "lowered" sends -10 from a caller at 10, which must wait for it. Which one ended first shows in the
    tokens charged to the first one's caller: a request's tokens are charged when it ends, before its
    last chunk is sent. A kernel that dropped the field would give the second request its caller's
    priority, and the opposite order.
    """
    stub = one_at_a_time
    running_caller = idle_caller(stub, 0)
    second_caller = idle_caller(stub, 10)
    if direction == "raised":
        stub.SetPriority(pb.SetPriorityRequest(pid=second_caller, priority=0))
    running = stub.Infer(pb.InferRequest(pid=running_caller, prompt=long_prompt, stream=True, sampling=pb.SamplingParams(
        max_tokens=LONG_TOKENS, temperature=0.0)), timeout=120)
    first = next(running)  # it is generating
    assert first.token_ids and not first.finish_reason
    [second] = infer(stub, pid=second_caller, prompt="the second request", priority=10 if direction == "raised" else -10,
                     sampling={"max_tokens": 30, "temperature": 0.0})
    charged_when_second_ended = tokens_charged(stub, running_caller)
    rest = list(running)
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == LONG_TOKENS
    running_total = rest[-1].usage.prompt_tokens + rest[-1].usage.completion_tokens
    assert tokens_charged(stub, running_caller) == running_total
    if direction == "raised":
        assert charged_when_second_ended == 0, "the raised request waited for the running one to end"
    else:
        assert charged_when_second_ended == running_total, "the lowered request overtook the running one"
    assert second.usage.completion_tokens > 0
    for pid in (running_caller, second_caller):
        stub.Kill(pb.KillRequest(pid=pid))
