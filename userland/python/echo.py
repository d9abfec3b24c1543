"""echo.py: an echo server, the Python twin of lua/echo.lua.

Replies to every message with the same body, tag, data and correlation_id,
sent back to the message's sender, until it gets a message tagged "stop".

args (all optional):
  name        register under this name so clients can send to "echo" etc.
  timeout_ms  stop by itself after this long without a message

Result: {"echoed": <messages echoed>, "stopped_by": <pid or None>}
(plus "timed_out": True when it stopped for lack of messages).

Try it:  llmos run userland/python/echo.py --args '{"name": "echo"}'
and from another shell send it messages (see the grpcurl walkthrough, docs/grpcurl.md).
"""
from llmos import LlmosError
from llmos.userland import sys

opts = sys.args if isinstance(sys.args, dict) else {}

if opts.get("name"):
    sys.register(opts["name"])  # raises if the name is taken; the process then crashes

echoed = 0
while True:
    msg = sys.recv(timeout_ms=opts.get("timeout_ms"))
    if msg is None:
        sys.log(f"echo: no message for {opts.get('timeout_ms')} ms, stopping")
        sys.exit({"echoed": echoed, "stopped_by": None, "timed_out": True})
    if msg.tag == "stop":
        # Acknowledge the stop so the sender knows we are done.
        sys.send(msg.sender, {"echoed": echoed}, tag="stopped", correlation_id=msg.correlation_id)
        sys.exit({"echoed": echoed, "stopped_by": msg.sender})
    # A message from the kernel (an EXIT notice comes from the ended pid) is
    # answered like any other; a reply to a pid that has ended fails, so catch it.
    try:
        sys.send(msg.sender, msg.body, tag=msg.tag, data=msg.data, correlation_id=msg.correlation_id)
        echoed += 1
    except LlmosError as e:
        sys.log(f"echo: could not reply to {msg.sender}: {e}")
