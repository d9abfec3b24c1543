"""The Lua userland: each process's Lua state, its sandbox and `sys` table, preemption, the metered
standard library, and the C fast paths of messages between Lua processes (runtime.py is the Python
side). See ARCHITECTURE.md."""
