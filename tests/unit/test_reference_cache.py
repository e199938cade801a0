"""The per-process reference cache: one catalogue version at a time, bounded, thread-shared."""

from __future__ import annotations

from infra.db.repositories import MISSING, ReferenceCache


class TestTheReferenceCache:
    def test_serves_an_entry_only_for_the_version_it_was_read_under(self) -> None:
        cache = ReferenceCache()
        cache.observe("v1")
        cache.put("v1", ("plan", "free"), "free plan")

        assert cache.get("v1", ("plan", "free")) == "free plan"
        assert cache.get("v2", ("plan", "free")) is MISSING

    def test_drops_everything_when_a_transaction_reads_another_version(self) -> None:
        cache = ReferenceCache()
        cache.observe("v1")
        cache.put("v1", ("portal", "acme"), "acme portal")

        cache.observe("v2")

        assert len(cache) == 0
        assert cache.get("v1", ("portal", "acme")) is MISSING

    def test_drops_what_a_slower_transaction_read_under_a_version_it_has_left(self) -> None:
        # Given a cache that moved on to v2 while a transaction that read v1 was loading an entry
        cache = ReferenceCache()
        cache.observe("v1")
        cache.observe("v2")

        # When that transaction stores what it loaded
        cache.put("v1", ("admin_key", "k1"), "key as of v1")

        # Then nobody is served it
        assert cache.get("v2", ("admin_key", "k1")) is MISSING
        assert len(cache) == 0

    def test_keeps_a_not_found_as_an_entry(self) -> None:
        cache = ReferenceCache()
        cache.observe("v1")
        cache.put("v1", ("portal", "nobody"), None)

        assert cache.get("v1", ("portal", "nobody")) is None

    def test_holds_at_most_its_bound_dropping_the_least_recently_used(self) -> None:
        cache = ReferenceCache(max_entries=2)
        cache.observe("v1")
        cache.put("v1", ("app", "a"), "a")
        cache.put("v1", ("app", "b"), "b")
        assert cache.get("v1", ("app", "a")) == "a"  # a is now the most recently used

        cache.put("v1", ("app", "c"), "c")

        assert len(cache) == 2
        assert cache.get("v1", ("app", "b")) is MISSING
        assert cache.get("v1", ("app", "a")) == "a"
        assert cache.get("v1", ("app", "c")) == "c"
