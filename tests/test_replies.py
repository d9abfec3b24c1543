"""Big values are converted off the event loop (api/replies.py, THREAD_BYTES): where each door's
conversion runs, observed by the thread it runs on. (tests/test_hostile.py sends such values
through a real server beside other calls.)"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from llmosd.api import syscalls
from llmosd.api.doors import call_syscall
from llmosd.api.replies import THREAD_BYTES, built
from llmosd.kernel.store import ProcessRecord

BIG_RESULT = list(range(20_000))  # well over THREAD_BYTES as JSON


def _thread() -> str:
    return threading.current_thread().name


async def _handler(k: Any, req: Any) -> str:
    return _thread()


def test_a_big_reply_is_built_in_the_converting_thread() -> None:
    async def main() -> tuple[str, str, str]:
        return await built(THREAD_BYTES, _thread), await built(THREAD_BYTES - 1, _thread), _thread()

    big, small, loop = asyncio.run(main())
    assert big.startswith("convert") and small == loop


@pytest.mark.parametrize(("method", "size", "off_loop"), [
    ("Send", THREAD_BYTES, True),  # does not block: converting its body would hold the loop
    ("Send", THREAD_BYTES - 1, False),
    ("Recv", THREAD_BYTES, False),  # may block: it awaits the kernel on the loop (its reply is built off it)
])
def test_a_big_request_to_a_syscall_that_does_not_block_runs_off_the_loop(method: str, size: int,
                                                                          off_loop: bool) -> None:
    async def main() -> tuple[str, str]:
        return await call_syscall(method, _handler, None, None, size), _thread()

    ran, loop = asyncio.run(main())
    assert ran.startswith("convert") if off_loop else ran == loop


def test_an_ended_process_with_a_big_result_is_answered_from_the_converting_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    process_pb = syscalls.process_pb
    monkeypatch.setattr(syscalls, "process_pb", lambda *args: threads.append(_thread()) or process_pb(*args))

    def record(result: Any) -> ProcessRecord:
        return ProcessRecord(pid=5, kind="LUA", name=None, parent=0, namespace="default", priority=0, weight=100,
                             limits={}, started_at_ms=1, state="EXITED", exit_reason="normal", result=result,
                             error=None, ended_at_ms=2, usage=None, log=[], log_dropped=0, opener=None)

    async def main() -> str:
        big = await syscalls._process_reply(record(BIG_RESULT))
        small = await syscalls._process_reply(record([1, 2]))
        assert list(big.result.list_value.values)[-1].number_value == BIG_RESULT[-1]
        assert len(small.result.list_value.values) == 2
        return _thread()

    loop = asyncio.run(main())
    assert threads[0].startswith("convert") and threads[1] == loop
