"""Subsystems that syscalls reach besides the process table: files, named locks and semaphores
(sync.py), and the bridge to the inference engine (inference.py). See ARCHITECTURE.md."""
