"""The stages of a worker's batch, one module each: dedup, the sequence gate, merge-and-route,
links/outbox. Each is a mixin of `worker.Worker`, which keeps the orchestration (boot, the
loop, commit order, fault points); their per-batch state is the attempt's `BatchState`.
"""
