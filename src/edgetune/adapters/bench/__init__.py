"""Benchmark suites of the adapters family (registered on import by the family plug-in)."""
