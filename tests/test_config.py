"""aggregator.config: the example file, overrides and their precedence, errors, secrets."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from aggregator.config import (
    Config,
    ConfigError,
    KafkaConfig,
    OpSpec,
    ServiceConfig,
    config_from_dict,
    default_config_path,
    is_secret_key,
    load_config,
    parse_size,
    redact,
)

SHOP = Path(__file__).resolve().parent.parent / "examples" / "shop.toml"
SECRET = "hunter2-s3cr3t"


@pytest.fixture(scope="module")
def shop_data() -> dict:
    with open(SHOP, "rb") as f:
        return tomllib.load(f)


@pytest.fixture
def data(shop_data: dict) -> dict:
    return copy.deepcopy(shop_data)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def error_of(data: dict, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, env={}, **kw)
    return str(info.value)


# ---- the example ----------------------------------------------------------------------------


def test_loads_example() -> None:
    cfg = load_config(SHOP, env={})
    assert cfg.kafka.group_id == "aggregator-shop"
    assert cfg.kafka.bootstrap_servers == ""
    assert cfg.service.workers == 2
    assert cfg.service.dead_letter_topic == "shop.deadletter"
    assert cfg.service.ring_bytes == 16 * 2**20  # default
    assert (cfg.service.commit_window_ms, cfg.service.commit_idle_ms) == (50, 5)  # defaults
    assert cfg.dedup.bloom_generations == 4
    assert cfg.gate.gap_policy == "skip"
    assert list(cfg.sources) == ["customers", "orders", "payments", "shipments", "inventory",
                                 "products", "reviews"]
    assert cfg.sources["payments"].ordering == "strict"
    assert set(cfg.views) == {"customer", "order", "product"}
    assert len(cfg.views["customer"].feeds) == 6
    upsert = cfg.views["customer"].feeds[2].ops[0]
    assert (upsert.op, upsert.path, upsert.id, upsert.from_) == (
        "upsert", "orders", "data.order_id", "data")
    assert upsert.fields == ["status", "amount_cents"]
    assert upsert.to_spec() == {"op": "upsert", "path": "orders", "id": "data.order_id",
                                "from": "data", "fields": ["status", "amount_cents"]}
    negate = cfg.views["product"].feeds[3].ops[1]
    assert negate.negate is True and negate.op == "add"


def test_default_path_is_the_example() -> None:
    assert default_config_path() == SHOP
    assert load_config(None, env={}) == load_config(SHOP, env={})


def test_frozen() -> None:
    cfg = load_config(SHOP, env={})
    with pytest.raises(ValidationError):
        cfg.service.workers = 8  # type: ignore[misc]


def test_topics_and_source_by_topic() -> None:
    cfg = load_config(SHOP, env={})
    assert cfg.topics() == sorted(cfg.topics())
    assert len(cfg.topics()) == 7
    name, src = cfg.source_by_topic("shop.reviews")
    assert name == "reviews" and src.ordering == "strict"
    with pytest.raises(KeyError, match="shop.nope"):
        cfg.source_by_topic("shop.nope")


def test_pickles_for_worker_processes() -> None:
    cfg = load_config(SHOP, {"kafka.common.sasl.password": SECRET}, env={})
    cfg.source_by_topic("shop.orders")
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg == load_config(SHOP, {"kafka.common.sasl.password": SECRET}, env={})
    assert again.source_by_topic("shop.orders")[0] == "orders"
    assert again.kafka.consumer_conf()["sasl.password"] == SECRET
    err = ConfigError([("service.workers", "must be >= 1 (got 0)")], "x.toml")
    copied = pickle.loads(pickle.dumps(err))
    assert (str(copied), copied.errors, copied.source) == (str(err), err.errors, "x.toml")


def test_fingerprint(data: dict) -> None:
    base = config_from_dict(data, env={}).fingerprint()
    assert base == load_config(SHOP, env={}).fingerprint()
    retuned = config_from_dict(data, {"service.workers": 8, "kafka.group_id": "g",
                                      "gate.gap_timeout_ms": 5, "dedup.bloom_capacity": 10},
                               env={})
    assert retuned.fingerprint() == base
    reordered = dict(data, sources=dict(reversed(list(data["sources"].items()))))
    assert config_from_dict(reordered, env={}).fingerprint() == base
    assert config_from_dict(data, {"sources.orders.ordering": "strict"},
                            env={}).fingerprint() != base
    assert config_from_dict(data, {"gate.gap_policy": "dead-letter"}, env={}).fingerprint() != base
    data["views"]["order"]["feeds"][0]["ops"][0]["path"] = "the_order"
    assert config_from_dict(data, env={}).fingerprint() != base


def test_structured_detect_changes_the_fingerprint_and_binding_does_not(data: dict) -> None:
    base = config_from_dict(data, env={})
    assert base.sources["orders"].structured == "binding"  # the Kafka binding by default
    # spelling out the default keeps the fingerprint of data dirs written before it existed
    same = config_from_dict(data, {"sources.orders.structured": "binding"}, env={})
    assert same.fingerprint() == base.fingerprint()
    detect = config_from_dict(data, {"sources.orders.structured": "detect"}, env={})
    assert detect.sources["orders"].structured == "detect"
    assert detect.fingerprint() != base.fingerprint()


def test_startup_timeout_and_max_worker_crashes(data: dict) -> None:
    cfg = config_from_dict(data, env={})
    assert cfg.kafka.startup_timeout_s == 60 and cfg.service.max_worker_crashes == 5
    cfg = config_from_dict(data, {"kafka.startup_timeout_s": 2.5}, env={
        "AGGREGATOR__SERVICE__MAX_WORKER_CRASHES": "3"})
    assert cfg.kafka.startup_timeout_s == 2.5 and cfg.service.max_worker_crashes == 3
    assert "startup_timeout_s" not in cfg.kafka.consumer_conf()  # ours, not librdkafka's


def test_nested_sections_get_defaults(data: dict) -> None:
    for section in ("kafka", "service", "dedup", "gate"):
        del data[section]
    cfg = config_from_dict(data, env={})
    assert cfg.service.workers == 2 and cfg.kafka.group_id == "aggregator"
    assert cfg.service.data_dir == Path("./data")


# ---- overrides --------------------------------------------------------------------------------


def test_env_shortcuts() -> None:
    env = {"AGGREGATOR_WORKERS": "4", "AGGREGATOR_DATA_DIR": "/var/lib/agg",
           "AGGREGATOR_BOOTSTRAP_SERVERS": "k1:9092,k2:9092", "AGGREGATOR_GROUP_ID": "g2",
           "AGGREGATOR_PURE_CORE": "1", "HOME": "/root"}  # not config: ignored
    cfg = load_config(SHOP, env=env)
    assert cfg.service.workers == 4
    assert cfg.service.data_dir == Path("/var/lib/agg")
    assert cfg.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert cfg.kafka.group_id == "g2"
    assert cfg.kafka.consumer_conf()["bootstrap.servers"] == "k1:9092,k2:9092"


def test_env_generic() -> None:
    env = {"AGGREGATOR__SERVICE__LMDB_SYNC": "false",
           "AGGREGATOR__SERVICE__RING_BYTES": "128MiB",
           "AGGREGATOR__GATE__GAP_POLICY": "dead-letter",
           "AGGREGATOR__DEDUP__BLOOM_FP_RATE": "0.001",
           "AGGREGATOR__SOURCES__ORDERS__ORDERING": "strict",
           "AGGREGATOR__KAFKA__CONSUMER__FETCH_QUEUE_BACKOFF_MS": "50",
           "AGGREGATOR__KAFKA__COMMON__SECURITY_PROTOCOL": "SASL_SSL"}
    cfg = load_config(SHOP, env=env)
    assert cfg.service.lmdb_sync is False
    assert cfg.service.ring_bytes == 128 * 2**20
    assert cfg.gate.gap_policy == "dead-letter"
    assert cfg.dedup.bloom_fp_rate == 0.001
    assert cfg.sources["orders"].ordering == "strict"
    assert cfg.kafka.consumer_conf()["fetch.queue.backoff.ms"] == "50"
    assert cfg.kafka.producer_conf()["security.protocol"] == "SASL_SSL"


def test_env_generic_typo_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SHOP, env={"AGGREGATOR__SERVICE__WORKRES": "3"})
    msg = str(info.value)
    assert msg.startswith("config error: service.workres: unknown key (did you mean 'workers'?)")
    assert "env AGGREGATOR__SERVICE__WORKRES" in msg


def test_env_bad_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SHOP, env={"AGGREGATOR_WORKERS": "many"})
    assert str(info.value) == ("config error: service.workers: must be an integer (got 'many') "
                               "[from env AGGREGATOR_WORKERS]")


def test_env_shortcut_and_generic_disagree() -> None:
    env = {"AGGREGATOR_WORKERS": "3", "AGGREGATOR__SERVICE__WORKERS": "5"}
    with pytest.raises(ConfigError, match="service.workers: env AGGREGATOR_WORKERS and "
                                          "AGGREGATOR__SERVICE__WORKERS disagree"):
        load_config(SHOP, env=env)
    env["AGGREGATOR__SERVICE__WORKERS"] = "3"
    assert load_config(SHOP, env=env).service.workers == 3


def test_cli_overrides() -> None:
    cfg = load_config(SHOP, {"service.workers": 4, "service.data_dir": "/tmp/x",
                             "kafka.producer.linger.ms": 20, "gate.max_parked_total": 7,
                             "gate.max_parked_per_key": 7, "kafka.group_id": None,
                             "service.commit_idle_ms": 0,
                             "kafka.consumer.fetch.wait.max.ms": 500}, env={})
    assert cfg.service.workers == 4
    assert cfg.service.commit_idle_ms == 0
    assert cfg.kafka.consumer_conf()["fetch.wait.max.ms"] == 500  # beats our default
    assert cfg.service.data_dir == Path("/tmp/x")
    assert cfg.kafka.producer_conf()["linger.ms"] == 20
    assert cfg.gate.max_parked_total == 7
    assert cfg.kafka.group_id == "aggregator-shop"  # None = not given


def test_cli_override_deep_merges_tables() -> None:
    cfg = load_config(SHOP, {"service": {"workers": 3}}, env={})
    assert cfg.service.workers == 3
    assert cfg.service.dead_letter_topic == "shop.deadletter"  # rest of the section kept


def test_precedence(tmp_path: Path) -> None:
    text = SHOP.read_text().replace("workers = 2", "workers = 5")
    path = write(tmp_path, text)
    assert load_config(path, env={}).service.workers == 5  # file > default
    no_workers = write(tmp_path, SHOP.read_text().replace("workers = 2", ""))
    assert load_config(no_workers, env={}).service.workers == 2  # default
    env = {"AGGREGATOR_WORKERS": "6"}
    assert load_config(path, env=env).service.workers == 6  # env > file
    assert load_config(path, {"service.workers": 7}, env=env).service.workers == 7  # CLI > env
    env = {"AGGREGATOR__SERVICE__WORKERS": "8"}
    assert load_config(path, env=env).service.workers == 8
    assert load_config(path, {"service.workers": 9}, env=env).service.workers == 9


def test_override_into_a_list_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"cannot set inside views\.customer\.feeds, a list"):
        load_config(SHOP, {"views.customer.feeds.source": "x"}, env={})


def test_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGGREGATOR_WORKERS", "11")
    assert load_config(SHOP).service.workers == 11


def test_data_is_not_modified(data: dict) -> None:
    before = copy.deepcopy(data)
    config_from_dict(data, {"service.workers": 3, "kafka.common.client.id": "x"}, env={})
    assert data == before


# ---- invalid configs --------------------------------------------------------------------------


def _feed(data: dict, view: str, i: int) -> dict:
    return data["views"][view]["feeds"][i]


INVALID = [
    # (id, mutate(data), exact first line of the message)
    ("typo", lambda d: d["service"].update(workres=3),
     "config error: service.workres: unknown key (did you mean 'workers'?)"),
    ("unknown_section", lambda d: d.update(kafak={}),
     "config error: kafak: unknown key (did you mean 'kafka'?)"),
    ("bad_ordering", lambda d: d["sources"]["orders"].update(ordering="lastest"),
     "config error: sources.orders.ordering: must be 'latest' or 'strict' (got 'lastest')"),
    ("unknown_source", lambda d: _feed(d, "customer", 2).update(source="ordrs"),
     "config error: views.customer.feeds[2].source: unknown source 'ordrs' (did you mean "
     "'orders'? known: customers, orders, payments, shipments, inventory, products, reviews)"),
    ("workers_zero", lambda d: d["service"].update(workers=0),
     "config error: service.workers: must be >= 1 (got 0)"),
    ("workers_too_many", lambda d: d["service"].update(workers=1000),
     "config error: service.workers: must be <= 256 (got 1000)"),
    ("workers_bool", lambda d: d["service"].update(workers=True),
     "config error: service.workers: must be an integer (got True)"),
    ("bad_size", lambda d: d["service"].update(ring_bytes="64 Megs"),
     "config error: service.ring_bytes: bad size '64 Megs': use a number of bytes or a number "
     "with B, KiB, MiB, GiB or TiB"),
    ("ring_too_small", lambda d: d["service"].update(ring_bytes="2MiB"),
     "config error: service.ring_bytes: must be >= 2*max_record_bytes + 1 MiB = 3 MiB "
     "(got 2 MiB)"),
    ("commit_idle_negative", lambda d: d["service"].update(commit_idle_ms=-1),
     "config error: service.commit_idle_ms: must be >= 0 (got -1)"),
    ("key_too_long", lambda d: d["service"].update(max_key_bytes=481),
     "config error: service.max_key_bytes: must be <= 480 (got 481)"),
    ("max_map_below_map", lambda d: d["service"].update(lmdb_map_size="2GiB",
                                                        lmdb_max_map_size="1GiB"),
     "config error: service.lmdb_max_map_size: must be >= lmdb_map_size = 2 GiB (got 1 GiB)"),
    ("missing_topic", lambda d: d["sources"]["orders"].pop("topic"),
     "config error: sources.orders.topic: required field missing"),
    ("bad_topic_name", lambda d: d["sources"]["orders"].update(topic="shop orders"),
     "config error: sources.orders.topic: bad topic name 'shop orders': use 1-249 of "
     "A-Z a-z 0-9 . _ -"),
    ("op_without_path", lambda d: _feed(d, "customer", 0)["ops"][0].pop("path"),
     "config error: views.customer.feeds[0].ops[0].path: required for op 'set'"),
    ("upsert_without_id", lambda d: _feed(d, "customer", 2)["ops"][0].pop("id"),
     "config error: views.customer.feeds[2].ops[0].id: required for op 'upsert' "
     "(e.g. id = \"data.item_id\")"),
    ("set_from_and_value", lambda d: _feed(d, "customer", 0)["ops"][0].update(value=1),
     "config error: views.customer.feeds[0].ops[0]: op 'set' needs exactly one of 'from' or "
     "'value' (got both)"),
    ("add_neither", lambda d: _feed(d, "customer", 3)["ops"][0].pop("from"),
     "config error: views.customer.feeds[3].ops[0]: op 'add' needs exactly one of 'from' or "
     "'value' (got neither)"),
    ("unknown_op", lambda d: _feed(d, "customer", 0)["ops"][0].update(op="sett"),
     "config error: views.customer.feeds[0].ops[0].op: must be 'set', 'merge', 'unset', "
     "'upsert', 'remove', 'add' or 'delete' (got 'sett')"),
    ("negate_on_set", lambda d: _feed(d, "customer", 0)["ops"][0].update(negate=True),
     "config error: views.customer.feeds[0].ops[0].negate: not allowed for op 'set'"),
    ("negate_not_bool", lambda d: _feed(d, "product", 3)["ops"][1].update(negate="yes"),
     "config error: views.product.feeds[3].ops[1].negate: must be true or false (got 'yes')"),
    ("fields_not_str", lambda d: _feed(d, "customer", 2)["ops"][0].update(fields=["a", 1]),
     "config error: views.customer.feeds[2].ops[0].fields[1]: must be a string (got 1)"),
    ("unset_with_from", lambda d: _feed(d, "customer", 1)["ops"][0].update({"from": "data"}),
     "config error: views.customer.feeds[1].ops[0].from: not allowed for op 'unset'"),
    ("delete_with_path", lambda d: _feed(d, "customer", 1)["ops"][0].update(op="delete"),
     "config error: views.customer.feeds[1].ops[0].path: not allowed: delete removes the "
     "whole document"),
    ("bad_selector", lambda d: _feed(d, "customer", 0)["ops"][0].update({"from": "dta.x"}),
     "config error: views.customer.feeds[0].ops[0].from: bad selector 'dta.x': use 'data', "
     "'data.<field>' or one of id, time, source, type, subject, partitionkey, sequence"),
    ("add_string_value", lambda d: _feed(d, "customer", 5)["ops"][0].update(value="1"),
     "config error: views.customer.feeds[5].ops[0].value: must be a number for op 'add' "
     "(got '1')"),
    ("op_typo", lambda d: _feed(d, "customer", 0)["ops"][0].update(feilds=["a"]),
     "config error: views.customer.feeds[0].ops[0].feilds: unknown key (did you mean "
     "'fields'?)"),
    ("no_ops", lambda d: _feed(d, "order", 0).update(ops=[]),
     "config error: views.order.feeds[0].ops: must not be empty"),
    ("no_types", lambda d: _feed(d, "order", 0).update(types=[]),
     "config error: views.order.feeds[0].types: must not be empty"),
    ("star_not_alone", lambda d: _feed(d, "order", 0).update(types=["*", "x"]),
     "config error: views.order.feeds[0].types: '*' (every type) must be the only entry"),
    ("bad_key", lambda d: _feed(d, "order", 1).update(key="order_id"),
     "config error: views.order.feeds[1].key: must be 'partitionkey' or 'data.<field>' "
     "(got 'order_id')"),
    ("duplicate_topic", lambda d: d["sources"]["payments"].update(topic="shop.orders"),
     "config error: sources.payments.topic: topic 'shop.orders' is already read by source "
     "'orders'"),
    ("dead_letter_is_source", lambda d: d["service"].update(dead_letter_topic="shop.orders"),
     "config error: service.dead_letter_topic: 'shop.orders' is also the topic of source "
     "'orders'"),
    ("bad_view_name", lambda d: d["views"].update(Customer=d["views"].pop("customer")),
     "config error: views.Customer: bad view name 'Customer': must match "
     "^[a-z][a-z0-9_]{0,63}$ (lowercase letters, digits, _)"),
    ("source_feeds_no_view", lambda d: d["sources"].update(audit={"topic": "shop.audit"}),
     "config error: sources.audit: source 'audit' feeds no view"),
    ("no_views", lambda d: d.update(views={}),
     "config error: views: must not be empty"),
    ("missing_sources", lambda d: d.pop("sources"),
     "config error: sources: required field missing"),
    ("fp_rate", lambda d: d["dedup"].update(bloom_fp_rate=0.5),
     "config error: dedup.bloom_fp_rate: must be < 0.5 (got 0.5)"),
    ("generations", lambda d: d["dedup"].update(bloom_generations=1),
     "config error: dedup.bloom_generations: must be >= 2 (got 1)"),
    ("gap_policy", lambda d: d["gate"].update(gap_policy="drop"),
     "config error: gate.gap_policy: must be 'skip' or 'dead-letter' (got 'drop')"),
    ("parked_total", lambda d: d["gate"].update(max_parked_total=10),
     "config error: gate.max_parked_total: must be >= max_parked_per_key = 1000 (got 10)"),
    ("kafka_bootstrap_in_dict", lambda d: d["kafka"]["common"].update(
        {"bootstrap.servers": "x:1"}),
     "config error: kafka.common.\"bootstrap.servers\": set kafka.bootstrap_servers instead"),
    ("kafka_auto_commit", lambda d: d["kafka"]["consumer"].update({"enable.auto.commit": True}),
     "config error: kafka.consumer.\"enable.auto.commit\": must stay false: the supervisor "
     "commits offsets after the workers have stored them"),
    ("kafka_list_value", lambda d: d["kafka"]["producer"].update({"acks": [1]}),
     "config error: kafka.producer.acks: must be a string, number or boolean (got list)"),
    ("startup_timeout_zero", lambda d: d["kafka"].update(startup_timeout_s=0),
     "config error: kafka.startup_timeout_s: must be > 0.0 (got 0)"),
    ("startup_timeout_text", lambda d: d["kafka"].update(startup_timeout_s="soon"),
     "config error: kafka.startup_timeout_s: must be a number (got 'soon')"),
    ("max_worker_crashes", lambda d: d["service"].update(max_worker_crashes=0),
     "config error: service.max_worker_crashes: must be >= 1 (got 0)"),
    ("structured_mode", lambda d: d["sources"]["orders"].update(structured="auto"),
     "config error: sources.orders.structured: must be 'binding' or 'detect' (got 'auto')"),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid(data: dict, mutate, expected: str) -> None:
    data.setdefault("kafka", {}).setdefault("common", {})
    mutate(data)
    msg = error_of(data)
    assert msg.splitlines()[0] == expected


def test_every_problem_on_its_own_line(data: dict) -> None:
    data["service"]["workers"] = 0
    data["sources"]["orders"]["ordering"] = "lastest"
    data["dedup"]["bloom_generations"] = 100
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, env={})
    assert str(info.value).splitlines() == [
        "config error: service.workers: must be >= 1 (got 0)",
        "config error: dedup.bloom_generations: must be <= 64 (got 100)",
        "config error: sources.orders.ordering: must be 'latest' or 'strict' (got 'lastest')",
    ]
    assert [p for p, _ in info.value.errors] == [
        "service.workers", "dedup.bloom_generations", "sources.orders.ordering"]


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[service]\nworkers = 2\nworkers 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"config error: {path}: TOML syntax error at line 3, "
                                      "column 9: ")


def test_duplicate_toml_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[service]\nworkers = 2\nworkers = 3\n")
    with pytest.raises(ConfigError, match="TOML syntax error at line 3"):
        load_config(path, env={})


def test_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"config error: {missing}: file not found"):
        load_config(missing, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, env={})
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(bad, env={})


def test_file_typo_through_load_config(tmp_path: Path) -> None:
    path = write(tmp_path, SHOP.read_text().replace("bloom_capacity", "bloom_capacty"))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == ("config error: dedup.bloom_capacty: unknown key "
                               "(did you mean 'bloom_capacity'?)")
    assert info.value.source == str(path)


# ---- op structure -------------------------------------------------------------------------


def test_merge_at_root_is_spelt_as_merge_py_expects() -> None:
    # merge.compile_ops takes path = "" for the root; the config may also leave it out
    assert OpSpec(op="merge", from_="data").to_spec() == {"op": "merge", "path": "",
                                                           "from": "data"}
    assert OpSpec(op="merge", path="", from_="data").path == ""
    assert OpSpec(op="delete", path="").to_spec() == {"op": "delete"}


@pytest.mark.parametrize("spec", [
    {"op": "merge", "path": "", "from": "data"},  # merge at the root
    {"op": "merge", "path": "a.b", "value": {"x": 1}},
    {"op": "upsert", "path": "tags", "id": "data.tag", "value": True},
    {"op": "set", "path": "seq", "from": "sequence"},
    {"op": "delete"},
    {"op": "unset", "path": "a"},
    {"op": "remove", "path": "items", "id": "data.item_id"},
    {"op": "add", "path": "n", "value": 1.5, "negate": False},
    {"op": "set", "path": "t", "from": "time"},
])
def test_valid_ops(spec: dict) -> None:
    assert OpSpec.model_validate(spec).to_spec() == spec


# An op that passes the op grammar but that the merge compiler rejects: a config error at
# load (field path, exit 2), not a boot failure in every worker.
COMPILER_REJECTS = [
    ("value = nan", "'value' must be a finite number, not nan"),
    ("value = inf", "'value' must be a finite number, not inf"),
    ("value = 2024-01-02", "'value' of type date is not JSON-like"),
    ("value = 2024-01-02T03:04:05Z", "'value' of type datetime is not JSON-like"),
    ("value = { a = [1, nan] }", "'value' must be a finite number, not nan"),
]


@pytest.mark.parametrize(("line", "expected"), COMPILER_REJECTS,
                         ids=[c[0] for c in COMPILER_REJECTS])
def test_op_the_compiler_rejects_is_a_config_error(tmp_path: Path, line: str,
                                                   expected: str) -> None:
    text = SHOP.read_text().replace(
        'ops = [{ op = "set", path = "profile", from = "data" }]',
        f'ops = [{{ op = "set", path = "profile", from = "data" }},\n'
        f'       {{ op = "set", path = "extra", {line} }}]', 1)
    assert text != SHOP.read_text()
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    (path, msg), = info.value.errors
    assert path.startswith("views.") and path.endswith(".ops[1]"), path
    assert expected in msg, msg


def test_op_the_compiler_rejects_exits_2(tmp_path: Path) -> None:
    text = SHOP.read_text().replace(
        'ops = [{ op = "set", path = "profile", from = "data" }]',
        'ops = [{ op = "set", path = "profile", from = "data" },\n'
        '       { op = "set", path = "extra", value = nan }]', 1)
    r = subprocess.run([sys.executable, "-m", "aggregator", "run", "-c",
                        str(write(tmp_path, text))],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert ".ops[1]: op #1 (set 'extra'): 'value' must be a finite number, not nan" in r.stderr


def test_op_by_field_name() -> None:
    assert OpSpec(op="set", path="p", from_="data").to_spec() == {
        "op": "set", "path": "p", "from": "data"}


# ---- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "n"), [
    ("64MiB", 64 << 20), ("1GiB", 1 << 30), ("512KiB", 512 << 10), ("1.5 GiB", 3 << 29),
    ("4096", 4096), ("100B", 100), ("2tib", 2 << 40), (1234, 1234),
])
def test_parse_size(text: object, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["64MB", "1.5B", "-1MiB", "MiB", "", "1e6"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


def test_sizes_in_service() -> None:
    svc = ServiceConfig(ring_bytes="128MiB", lmdb_map_size="2GiB", max_record_bytes="512KiB")
    assert (svc.ring_bytes, svc.lmdb_map_size, svc.max_record_bytes) == (
        128 << 20, 2 << 30, 512 << 10)


# ---- kafka settings and secrets ------------------------------------------------------------


def test_consumer_and_producer_conf(data: dict) -> None:
    data["kafka"]["common"] = {"security.protocol": "SASL_SSL", "linger.ms": 1,
                               "client.id": "agg"}
    data["kafka"]["consumer"] = {"auto.offset.reset": "latest"}
    data["kafka"]["bootstrap_servers"] = "b:9092"
    kafka = config_from_dict(data, env={}).kafka
    assert kafka.consumer_conf() == {
        "enable.auto.commit": False,
        "auto.offset.reset": "latest",  # consumer dict beats default
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.queue.backoff.ms": 20,
        "fetch.wait.max.ms": 100,
        "enable.partition.eof": False,
        "queued.max.messages.kbytes": 2048,
        "security.protocol": "SASL_SSL",
        "linger.ms": 1,
        "client.id": "agg",
        "bootstrap.servers": "b:9092",
        "group.id": "aggregator-shop",
    }
    assert kafka.producer_conf() == {
        "enable.idempotence": True,
        "linger.ms": 5,  # producer dict beats common
        "compression.type": "lz4",
        "queue.buffering.max.kbytes": 16384,
        "security.protocol": "SASL_SSL",
        "client.id": "agg",
        "bootstrap.servers": "b:9092",
    }
    assert kafka.admin_conf() == {"security.protocol": "SASL_SSL", "linger.ms": 1,
                                  "client.id": "agg", "bootstrap.servers": "b:9092"}


def test_nested_librdkafka_keys_are_flattened() -> None:
    # an unquoted TOML key `fetch.wait.max.ms = 10` arrives as nested tables
    kafka = KafkaConfig(consumer={"fetch": {"wait": {"max": {"ms": 10}}}})
    assert kafka.consumer_conf()["fetch.wait.max.ms"] == 10


def test_librdkafka_accepts_our_conf() -> None:
    ck = pytest.importorskip("confluent_kafka")
    kafka = KafkaConfig(bootstrap_servers="127.0.0.1:1", group_id="t")
    ck.Consumer(kafka.consumer_conf()).close()
    ck.Producer(kafka.producer_conf()).flush(0)


SECRET_TOML = f"""
[kafka]
bootstrap_servers = "b:9093"
[kafka.common]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "PLAIN"
"sasl.username" = "svc"
"sasl.password" = "{SECRET}"
[kafka.producer]
"ssl.key.password" = "{SECRET}"
"""


@pytest.fixture
def secret_config(tmp_path: Path) -> Config:
    text = SHOP.read_text().split("[service]")[1]
    path = write(tmp_path, SECRET_TOML + "[service]" + text)
    return load_config(path, env={})


def test_secret_never_shown(secret_config: Config, caplog: pytest.LogCaptureFixture) -> None:
    cfg = secret_config
    for text in (repr(cfg), str(cfg), repr(cfg.kafka), str(cfg.kafka), str(cfg.redacted()),
                 str(cfg.kafka.redacted()), cfg.model_dump_json(), str(cfg.model_dump()),
                 str(redact(cfg.kafka.consumer_conf())), str(redact(cfg.kafka.producer_conf()))):
        assert SECRET not in text
    assert "SASL_SSL" in str(cfg.redacted())  # only secrets are hidden
    assert cfg.redacted()["kafka"]["common"]["sasl.password"] == "***"
    # librdkafka marks sasl.username sensitive too
    assert cfg.redacted()["kafka"]["common"]["sasl.username"] == "***"
    assert cfg.kafka.redacted()["producer"]["ssl.key.password"] == "***"
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("config %s %r %s", cfg, cfg, cfg.kafka)
        load_config(SHOP, {"kafka.common.sasl.password": SECRET}, env={})
    assert caplog.text and SECRET not in caplog.text


def test_secret_reaches_librdkafka(secret_config: Config) -> None:
    assert secret_config.kafka.consumer_conf()["sasl.password"] == SECRET
    assert secret_config.kafka.producer_conf()["ssl.key.password"] == SECRET
    assert "ssl.key.password" not in secret_config.kafka.consumer_conf()


def test_secret_from_env_and_override() -> None:
    env = {"AGGREGATOR__KAFKA__COMMON__SASL_PASSWORD": SECRET}
    cfg = load_config(SHOP, env=env)
    assert cfg.kafka.consumer_conf()["sasl.password"] == SECRET
    assert SECRET not in repr(cfg)
    cfg = load_config(SHOP, env={"AGGREGATOR__KAFKA__PRODUCER__SSL__KEY_PASSWORD": SECRET})
    assert cfg.kafka.producer_conf()["ssl.key.password"] == SECRET
    cfg = load_config(SHOP, {"kafka.common.sasl.oauthbearer.client.secret": SECRET}, env={})
    assert cfg.kafka.producer_conf()["sasl.oauthbearer.client.secret"] == SECRET
    assert SECRET not in str(cfg)


def test_secret_not_in_error_messages() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SHOP, {"kafka.common.sasl.password": [SECRET]}, env={})
    assert "kafka.common.\"sasl.password\"" in str(info.value)
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(SHOP, {"kafka.sasl_password": SECRET}, env={})
    assert SECRET not in str(info.value)
    with pytest.raises(ValidationError) as v_info:
        KafkaConfig(common={"sasl.password": SECRET}, group_id="")
    assert SECRET not in str(v_info.value)


@pytest.mark.parametrize("key", [
    "sasl.password", "ssl.key.password", "sasl.jaas.config", "sasl.oauthbearer.client.secret",
    "ssl.keystore.password", "ssl.key.pem", "SASL.PASSWORD", "sasl.username",
    "ssl.key.location", "sasl.oauthbearer.config",
    # misspelt or unknown: still secret (librdkafka refuses them, our logs must not show them)
    "sasl.pasword", "sasl.passwd", "sasl.pwd", "ssl.key.pasword", "ssl.keystore.passwrd",
    "sasl.oauthbearer.client.secert", "sasl.credentials", "my.api.token", "client.secret"])
def test_secret_keys(key: str) -> None:
    kafka = KafkaConfig(common={key: SECRET})
    assert SECRET not in repr(kafka) and kafka.redacted()["common"][key] == "***"
    assert kafka.consumer_conf()[key] == SECRET
    assert is_secret_key(key)


@pytest.mark.parametrize("key", [
    "security.protocol", "sasl.mechanism", "sasl.mechanisms", "client.id", "linger.ms",
    "compression.type", "partition.assignment.strategy", "ssl.ca.location",
    "sasl.kerberos.service.name", "sasl.oauthbearer.token.endpoint.url",
    "sasl.oauthbearer.method", "ssl.endpoint.identification.algorithm",
    "topic.metadata.propagation.max.ms", "max.partition.fetch.bytes"])
def test_plain_keys_stay_visible(key: str) -> None:
    assert not is_secret_key(key)
    assert KafkaConfig(common={key: "v"}).redacted()["common"][key] == "v"


# ---- cluster mode ----------------------------------------------------------------------------


def test_cluster_defaults_name_the_topics_after_the_group(data: dict) -> None:
    data["cluster"] = {"enabled": True, "tasks": 8}
    cfg = config_from_dict(data, env={})
    assert cfg.tasks_topic() == "aggregator-shop.tasks"
    assert cfg.changelog_topic() == "aggregator-shop.changelog"
    data["cluster"] |= {"tasks_topic": "t", "changelog_topic": "c"}
    cfg = config_from_dict(data, env={})
    assert (cfg.tasks_topic(), cfg.changelog_topic()) == ("t", "c")
    assert config_from_dict(shop_data_copy(data), env={}).cluster.enabled is False


def shop_data_copy(data: dict) -> dict:
    d = copy.deepcopy(data)
    d.pop("cluster")
    return d


def test_cluster_tasks_need_not_be_a_multiple_of_the_workers(data: dict) -> None:
    # placement.py spreads whatever tasks an instance owns over its workers by count
    data["cluster"] = {"enabled": True, "tasks": 9}
    assert config_from_dict(data, env={}).cluster.tasks == 9


def test_cluster_topics_must_not_be_other_topics(data: dict) -> None:
    data["cluster"] = {"enabled": True, "tasks": 8, "changelog_topic": "shop.orders"}
    assert "'shop.orders' is also a source" in error_of(data)


# ---- http ------------------------------------------------------------------------------------


def test_http_connection_bounds_have_defaults_and_are_validated() -> None:
    http = load_config(SHOP, env={}).http
    assert (http.head_timeout_ms, http.max_connections, http.max_connections_per_client) == (
        10_000, 1024, 128)
    http = load_config(SHOP, env={"AGGREGATOR__HTTP__HEAD_TIMEOUT_MS": "2500"}).http
    assert http.head_timeout_ms == 2500
    for key in ("head_timeout_ms", "max_connections", "max_connections_per_client"):
        with pytest.raises(ConfigError, match=f"config error: http.{key}: "):
            load_config(SHOP, {f"http.{key}": 0}, env={})


def test_http_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    for content in (f"{SECRET}\n", f"{SECRET}\r\n", SECRET):
        path.write_text(content)
        cfg = load_config(SHOP, {"http.token_file": str(path)}, env={})
        assert cfg.http.token.get_secret_value() == SECRET
        assert SECRET not in repr(cfg) and SECRET not in str(cfg.redacted())
    env = {"AGGREGATOR__HTTP__TOKEN_FILE": str(path)}  # systemd: Environment=...=%d/token
    assert load_config(SHOP, env=env).http.token.get_secret_value() == SECRET
    # an empty token from the environment is no token: no conflict
    env["AGGREGATOR__HTTP__TOKEN"] = ""
    assert load_config(SHOP, env=env).http.token.get_secret_value() == SECRET


@pytest.mark.parametrize(("content", "overrides", "expected"), [
    (None, {}, "cannot read '{path}': No such file or directory"),
    ("", {}, "'{path}' is empty"),
    ("\n", {}, "'{path}' is empty"),
    (f"{SECRET}\n\n", {}, "holds spaces or control characters"),
    (f"{SECRET} x", {}, "holds spaces or control characters"),
    (b"\xff\xfe", {}, "is not UTF-8 text"),
    (SECRET, {"http.token": "other"}, "set http.token or http.token_file, not both"),
])
def test_http_token_file_problems(tmp_path: Path, content, overrides, expected) -> None:
    path = tmp_path / "token"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(SHOP, {"http.token_file": str(path), **overrides}, env={})
    msg = str(info.value)
    assert msg.startswith("config error: http.token_file: "), msg
    assert expected.format(path=path) in msg
    assert SECRET not in msg


def test_http_token_file_problem_exits_2(tmp_path: Path) -> None:
    """A real `aggregator run`: the error names the field, nothing starts."""
    env = dict(os.environ, AGGREGATOR__HTTP__TOKEN_FILE=str(tmp_path / "missing"))
    proc = subprocess.run([sys.executable, "-m", "aggregator", "run", "-c", str(SHOP),
                           "--data-dir", str(tmp_path / "data")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("config error: http.token_file: cannot read "), proc.stderr
    assert "Traceback" not in proc.stderr
