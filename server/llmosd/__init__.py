"""llmosd: the llmos kernel, a gRPC server for LLM agent processes."""
