"""Benchmarks of the relay against websockify, a plain asyncio pipe and direct TCP.

Run `python -m bench` (or `python -m bench --quick`); see docs/PERFORMANCE.md. Nothing here is
imported by the relay or the tests, and nothing here asserts on time.
"""
