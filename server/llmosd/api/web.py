"""HTTP plumbing shared by the gateway (http.py) and the OpenAI endpoints (openai_api.py): errors
as JSON with google.rpc's status mapping, bodies read strictly, Server-Sent Events, and the part of
a gRPC call context the syscall table uses."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

from .errors import InvalidArgument
from .doors import status_of

BODY_SLACK = 64 << 10  # JSON framing around a message of the largest size, as gRPC's limit allows

# google.rpc.Code -> HTTP status (the mapping of google/rpc/code.proto, AIP-193).
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500,
}
# aiohttp's own refusals (no route, wrong verb...) -> the gRPC status they stand for.
STATUS_OF_HTTP = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "INVALID_ARGUMENT"}
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's escape of a UTF-16 surrogate
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- errors -----------------------------------------------------------------------------------
def error_body(status: str, message: str) -> dict[str, Any]:
    return {"error": {"code": HTTP_STATUS[status], "status": status, "message": message}}


def error_response(status: str, message: str) -> web.Response:
    return web.json_response(error_body(status, message), status=HTTP_STATUS[status])


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every answer is JSON, aiohttp's own refusals and kernel bugs included: a client never
    sees an HTML error page, and a bug is logged and answered INTERNAL."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        status = STATUS_OF_HTTP.get(e.status, "INVALID_ARGUMENT" if e.status < 500 else "INTERNAL")
        return web.json_response({"error": {"code": e.status, "status": status, "message": e.reason}},
                                 status=e.status)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        return error_response(*status_of(request.path, e))


# -- requests ---------------------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body; InvalidArgument if it is more than `limit` bytes. Decode it with json_value,
    through replies.built (a big one in the converting thread)."""
    if request.content_length is not None and request.content_length > limit:
        raise InvalidArgument(f"the request body is {request.content_length} bytes, more than the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.content.iter_any():  # counted as it arrives: no length need be given
        size += len(chunk)
        if size > limit:
            raise InvalidArgument(f"the request body is more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def json_value(raw: bytes) -> Any:
    """A request body as a JSON value (an empty body is {}); InvalidArgument for anything else:
    not UTF-8, not JSON (NaN and Infinity are not JSON), nested too deep."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"the request body is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(f"the request body is not JSON: {e}") from None
    if SURROGATE_ESCAPE.search(raw):  # rare: only then is every string looked at
        _refuse_lone_surrogates(value)
    return value


def _refuse_lone_surrogates(value: Any) -> None:
    """InvalidArgument if any string (key or value) holds a surrogate left unpaired by a \\u
    escape: it is not Unicode text, and protobuf fails on it in ways of its own."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument("the request body holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape "
                                      "without its pair), which is not Unicode text") from None


class HttpCall:
    """The part of a gRPC ServicerContext the syscall table uses, for an HTTP request: its
    headers as the call's metadata, and a cancel check before a write is committed."""

    def __init__(self, request: web.Request) -> None:
        self.request = request

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((key.lower(), value) for key, value in self.request.headers.items())

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no client certificates over HTTP: a token (Authorization: Bearer) says who calls

    async def send_initial_metadata(self, metadata: Any) -> None:
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise asyncio.CancelledError()


# -- streams ----------------------------------------------------------------------------------
async def stream_sse(request: web.Request, items: AsyncIterator[Any], method: str,
                     to_json: Callable[[Any], Any], finish: Callable[[str], None],
                     done: bytes = b"event: end\ndata: {}\n\n") -> web.StreamResponse:
    """Answer a streaming syscall `method` with Server-Sent Events, one per item. A failure
    before the first item is a plain error response; after it, an `event: error`. The iterator
    is closed whatever happens (a client that goes away cancels the handler, which cancels the
    syscall), and `finish` is called with the call's status (syscalls.finish_call)."""
    code = "OK"
    try:
        try:
            first = await items.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:
            code, text = status_of(method, e)
            return error_response(code, text)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            if first is not None:
                await response.write(sse_data(to_json(first)))
                async for item in items:
                    await response.write(sse_data(to_json(item)))
            await response.write(done)
        except (asyncio.CancelledError, ConnectionResetError):
            code = "CANCELLED"
            raise
        except Exception as e:
            code, text = status_of(method, e)
            await response.write(b"event: error\n" + sse_data(error_body(code, text)))
        return response
    finally:
        finish(code)
        await items.aclose()  # type: ignore[attr-defined]


def sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
