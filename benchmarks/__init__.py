"""Benchmarks of the eventhandler worker, each figure measured beside a baseline in the same run.

`python -m benchmarks [--quick] [--json PATH] [--only NAME,…]` starts (or finds) a broker and a
PostgreSQL server the way the tests do, runs the scenarios one after another and prints one table.
Targets are reported as PASS/MISS and never change the exit status: only a crash does.
"""
