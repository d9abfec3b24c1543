"""The HTTP/JSON gateway: every syscall as `POST /v1/kernel/<Method>`, beside gRPC.

Same process, same event loop and same syscall table (syscalls.SYSCALLS) as the gRPC server:
a request body is the method's request message in the protobuf JSON mapping
(google.protobuf.json_format: camelCase or proto field names on input, camelCase on output,
64-bit integers as strings, bytes as base64), parsed strictly (unknown fields are refused), and
the table entry gRPC calls answers it. Headers are the call's metadata (`llmos-token`, ...).

- Server-streaming methods (Infer, Events, ReadFile) answer as Server-Sent Events: one
  `data: <message JSON>` event per message, then `event: end`; a failure once the stream has
  begun is an `event: error` whose data is the error body. A failure before the first message
  is a plain error response.
- WriteFile: the request body is the file's bytes (streamed to the kernel as it arrives); path,
  append and pid are query parameters.
- Errors: `{"error": {"code": HTTP status, "status": "NOT_FOUND", "message": ...}}`, the HTTP
  status from the gRPC code as google.rpc's mapping (AIP-193) gives it. A body that is not
  JSON, not UTF-8, of the wrong shape, or larger than --max-message-bytes is 400
  INVALID_ARGUMENT.
- `/` serves the web console's static files (api/console/), `/metrics` Prometheus text, and
  `/v1/...` the OpenAI-compatible endpoints (openai_api.py).
"""
from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any, AsyncIterator

from aiohttp import web
from google.protobuf import json_format, message_factory

from llmos.v1 import kernel_pb2 as pb

from .errors import InvalidArgument
from ..kernel.kernel import Kernel
from .identity import Identity
from .doors import call_syscall, count_call, finish_call, status_of
from .syscalls import CALL, SERVICE, SYSCALLS
from . import metrics, openai_api
from .replies import built
from .web import BODY_SLACK, HttpCall, error_response, json_errors, json_value, read_body, stream_sse

CONSOLE_DIR = pathlib.Path(__file__).resolve().parent / "console"


# -- requests ---------------------------------------------------------------------------------
def parse_message(obj: Any, message_class: type, what: str) -> Any:
    """A protobuf message from its JSON mapping, strictly: unknown fields, wrong types and text
    that cannot be stored (lone surrogates) are InvalidArgument."""
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    msg = message_class()
    try:
        json_format.ParseDict(obj, msg)
        msg.ByteSize()  # strings are encoded here: a lone surrogate fails now, not in the kernel
    except (json_format.ParseError, ValueError, TypeError, UnicodeError, RecursionError) as e:
        raise InvalidArgument(f"{what}: {e}") from None
    return msg


def message_json(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)


# -- the gateway ------------------------------------------------------------------------------
class Gateway:
    """`POST /v1/kernel/<Method>` for every method of the service, through SYSCALLS."""

    def __init__(self, kernel: Kernel, single_user: bool) -> None:
        self.kernel = kernel
        self.identity = Identity(kernel, agents=False, single_user=single_user)
        self.body_limit = kernel.config.max_message_bytes + BODY_SLACK
        self.methods = {m.name: m for m in SERVICE.methods}
        self.request_classes = {m.name: message_factory.GetMessageClass(m.input_type) for m in SERVICE.methods}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["method"]
        method = self.methods.get(name)
        if method is None:
            return error_response("NOT_FOUND", f"no syscall {name!r}; the syscalls are {', '.join(self.methods)}")
        if request.method != "POST":
            return error_response("UNIMPLEMENTED", f"{name} is called with POST, not {request.method}")
        call = HttpCall(request)
        CALL.set(call)
        fn = SYSCALLS[name]
        began, code, checked = time.perf_counter(), "OK", None
        try:
            if method.client_streaming:
                req: Any = self._write_file_requests(request)
                size = 0
            else:
                raw = await read_body(request, self.body_limit)
                cls, size = self.request_classes[name], len(raw)
                req = await built(size, lambda: parse_message(json_value(raw), cls, f"{name} request"))
            checked = self.identity.check(name, req, call)
            if method.server_streaming:
                began = None  # a stream is counted, not timed; stream_sse finishes it
                return await stream_sse(request, fn(self.kernel, checked), name, message_json,
                                        lambda code: finish_call(self.identity, name, checked, code))
            return web.json_response(message_json(await call_syscall(name, fn, self.kernel, checked, size)))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            code, text = status_of(name, e)
            return error_response(code, text)
        finally:
            if checked is None:
                count_call(name, code, began)  # not audited: no caller to name
            elif began is not None:
                finish_call(self.identity, name, checked, code, began)

    def _write_file_requests(self, request: web.Request) -> AsyncIterator[pb.WriteFileRequest]:
        """WriteFile's stream: the query's path, append and pid first, then the body's bytes."""
        query = dict(request.query)
        if "append" in query:
            if query["append"] not in ("true", "false", "1", "0"):
                raise InvalidArgument("append must be true or false")
            query["append"] = query["append"] in ("true", "1")  # type: ignore[assignment]
        first = parse_message(query, pb.WriteFileRequest, "WriteFile query")

        async def requests() -> AsyncIterator[pb.WriteFileRequest]:
            yield first
            async for chunk in request.content.iter_chunked(1 << 20):
                yield pb.WriteFileRequest(data=chunk)

        return requests()


# -- the console's static files ---------------------------------------------------------------
async def console_file(request: web.Request) -> web.StreamResponse:
    """A file of the web console (no build step: the files as they are in the package)."""
    rel = request.match_info.get("path") or "index.html"
    root = CONSOLE_DIR.resolve()
    path = (root / rel).resolve()
    if root not in path.parents or not path.is_file():
        return error_response("NOT_FOUND", f"no console file {rel!r}")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


# -- the listener -----------------------------------------------------------------------------
def make_app(kernel: Kernel, single_user: bool) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=kernel.config.max_message_bytes + BODY_SLACK)
    gateway = Gateway(kernel, single_user)
    app.router.add_route("*", "/v1/kernel/{method}", gateway.handle)
    openai_api.add_routes(app, kernel, single_user)
    app.router.add_get("/metrics", metrics.handler(kernel))
    app.router.add_get("/", console_file)
    app.router.add_get("/{path:.+}", console_file)
    return app


async def start_http(kernel: Kernel, address: str, single_user: bool) -> tuple[web.AppRunner, str]:
    """Serve the HTTP API on `address` (HOST:PORT; port 0 picks a free one) on the running
    loop; returns the runner (to clean up) and the address bound. Callers are who their
    `Authorization: Bearer TOKEN` says (api/identity.py); without one, the owner of `default`
    in `single_user` mode, else UNAUTHENTICATED."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"llmosd: --http takes HOST:PORT, not {address!r}")
    host = host.strip("[]")
    # handler_cancellation: a client that goes away cancels its call, as in gRPC (a Recv
    # cancelled puts its message back).
    runner = web.AppRunner(make_app(kernel, single_user), handler_cancellation=True, access_log=None,
                           shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, int(port), reuse_port=False)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise SystemExit(f"llmosd: cannot serve HTTP on {address}: {e.strerror or e}")
    bound = runner.addresses[0]
    where = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
    return runner, where
