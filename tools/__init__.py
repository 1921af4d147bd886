"""Benchmarks, profiles and the README's result collector (scripts, not library code)."""
