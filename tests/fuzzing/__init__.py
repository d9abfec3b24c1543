"""A property-based fuzzer of llmosd: every RPC of llmos.v1.Kernel, the Lua `sys`
table and Python agents, against a real server over real gRPC.

- harness.py: the server under test, calls by method descriptor, the invariants
  (documented statuses, health, timers, read-back, idle CPU, RSS, a clean log);
- values.py: hostile values (JSON bodies, text, numbers) and what the value model
  (/work/notes/DECISIONS.md, README "Values cross as JSON") says becomes of them;
- requests.py: request messages built from the .proto descriptors, with the rules
  a request must be refused by, and mutations of their wire bytes;
- lua_programs.py: Lua programs that call every `sys` function with hostile
  arguments, in hostile contexts, and check what each call answered;
- machine.py: random sequences of calls against a model of what must exist
  (ports, messages not yet received, files, locks);
- targets.py: the Hypothesis tests themselves, run by tests/test_fuzz.py (a
  bounded, seeded CI profile) and tools/fuzz.py (N minutes, random seeds).
"""
