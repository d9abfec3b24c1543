"""Every way into the kernel from outside: the syscall table (syscalls.py), the argument checks
(checks.py) and status codes (errors.py) it applies, and the servers that expose it (gRPC today).
See ARCHITECTURE.md."""
