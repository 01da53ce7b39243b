"""Fault-injection tests: real worker processes, real PostgreSQL, real faults."""
