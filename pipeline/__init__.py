"""The Ray runtime and command line of raysource.

Controller, AggregateHost and KafkaIngestor actors, the dispatch entry point,
backfills, configuration, metrics and the CLI. May import ``aggregates`` and
``store``.
"""
