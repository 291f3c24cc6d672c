"""The compiled view plan: which feeds an event of (source, type) drives, and their merge ops.

Built once per process from the config; the hot path asks `feeds(source_index, type)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config
from .merge import MergePlan
from .merger import compile_ops


@dataclass(frozen=True, slots=True)
class Feed:
    feed_id: int  # global index, stable for one config (forwarded updates name it)
    view: str
    view_id: int
    key_path: tuple[str, ...] | None  # None: the partition key; else a path below `data`
    merge: MergePlan  # or its compiled twin (_merge.MergePlan, same API; merger.py)


class ViewPlan:
    """Per source index: event type → feeds (exact types first, then '*' feeds)."""

    def __init__(self, config: Config, view_ids: dict[str, int]):
        self.topics = config.topics()
        self.source_names: list[str] = []
        self.strict: list[bool] = []
        self.initial: list[int] = []
        for topic in self.topics:
            name, src = config.source_by_topic(topic)
            self.source_names.append(name)
            self.strict.append(src.ordering == "strict")
            self.initial.append(src.initial_sequence)
        self.feeds: list[Feed] = []
        self._by_type: list[dict[str, list[Feed]]] = [{} for _ in self.topics]
        self._wild: list[list[Feed]] = [[] for _ in self.topics]
        index = {name: i for i, name in enumerate(self.source_names)}
        for view_name, view in config.views.items():
            view_specs = [op.model_dump(by_alias=True, exclude_none=True)
                          for feed_cfg in view.feeds for op in feed_cfg.ops]
            for feed_cfg in view.feeds:
                specs = [op.model_dump(by_alias=True, exclude_none=True) for op in feed_cfg.ops]
                key = feed_cfg.key
                path = None if key == "partitionkey" else tuple(key.split(".")[1:])
                feed = Feed(len(self.feeds), view_name, view_ids[view_name], path,
                            compile_ops(specs, view_specs))
                self.feeds.append(feed)
                si = index[feed_cfg.source]
                for t in feed_cfg.types:
                    if t == "*":
                        self._wild[si].append(feed)
                    else:
                        self._by_type[si].setdefault(t, []).append(feed)
        self._cache: list[dict[str, tuple[Feed, ...]]] = [{} for _ in self.topics]

    def feeds_for(self, source_index: int, event_type: str) -> tuple[Feed, ...]:
        cache = self._cache[source_index]
        feeds = cache.get(event_type)
        if feeds is None:
            feeds = tuple(self._by_type[source_index].get(event_type, ())) + tuple(
                self._wild[source_index]
            )
            if len(cache) < 10_000:
                cache[event_type] = feeds
        return feeds


def assign_view_ids(existing: list[str] | None, views: list[str]) -> list[str]:
    """Stable view ids: keep the stored order, append new views (ids are one byte)."""
    order = list(existing or [])
    for v in views:
        if v not in order:
            order.append(v)
    if len(order) > 255:
        raise ValueError("at most 255 views per data directory")
    return order
