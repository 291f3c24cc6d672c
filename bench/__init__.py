"""Benchmarks of the aggregator: `python -m bench` (end to end), plus pytest micro-benchmarks.

Modules, one job each (the complete index, with commands: bench/README.md):

- `run.py`: the command line and the order of the stages;
- `workload.py`: the seeded workload, loading it onto the broker, config overrides;
- `stages/service.py`: the aggregator in a child process, timed and verified;
- `stages/raw.py`: the ceiling, raw confluent-kafka consumption;
- `stages/baseline.py`: the hand-written single-process in-memory implementation;
- `stages/latency.py`: paced load and produce → state-committed latency;
- `stages/worker_stage.py`: the worker stage alone, fed from pre-encoded ring messages;
- `metrics.py`: RSS/CPU sampling of process trees, durable-offset polling of the shards;
- `verify.py`: views against the oracle;
- `report.py`: JSON, markdown and the PNG chart;
- `micro/`: micro-benchmarks; `tools/`: standalone long runs and tools.
"""
