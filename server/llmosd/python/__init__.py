"""The Python userland: agents run as sandboxed subprocesses (sandbox/) that reach the kernel over
gRPC on the agent socket (runtime.py is the kernel's side). See ARCHITECTURE.md."""
