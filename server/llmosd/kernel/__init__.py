"""The kernel proper: the process table (kernel.py), processes (process.py), the scheduler, waiting
and timers, mailboxes (their C half is mailbox.c), the database (store.py) and process logs.
See ARCHITECTURE.md."""
