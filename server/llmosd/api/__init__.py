"""Every way into the kernel from outside: the syscall table (syscalls.py), the argument checks
(checks.py) and status codes (errors.py) it applies, and the servers that expose it: gRPC, and
over HTTP (http.py, with web.py) the same table as JSON, the OpenAI API (openai_api.py) and
/metrics (metrics.py).
See ARCHITECTURE.md."""
