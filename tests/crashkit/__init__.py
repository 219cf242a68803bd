"""Crash-safety harness: a warm child process forks trial processes that are SIGKILLed at seeded points."""
