"""aggregator: merge state-carrying CloudEvents from many Kafka topics into per-key views."""

__version__ = "0.1.0"
