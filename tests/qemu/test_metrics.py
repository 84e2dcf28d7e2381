"""A real QEMU 7.2 migration through migtap with --metrics-listen: /metrics scraped over HTTP
while it runs (the per-session gauges move) and after it (the counters equal the
migration_summary, the per-session series are gone)."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from migtap.config import Address
from tests.qemu.harness import vm_pair
from tests.qemu.test_relay_migrations import migration_summary

if TYPE_CHECKING:
    from pathlib import Path

ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])
MiB = 1024 * 1024

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    """GET /metrics over HTTP (in a worker thread), parsed with prometheus_client's parser."""

    def get() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def per_session(samples: Samples, name: str) -> list[float]:
    return [v for (n, labels), v in samples.items() if n == name and dict(labels).get("session")]


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@ONE_LOOP
async def test_metrics_move_during_a_real_migration_and_equal_the_summary_after(
    tmp_path: Path, make_relay: Any
) -> None:
    async with vm_pair(tmp_path, mem_mib=128, random_mib=64) as pair:
        # 64 MiB of random RAM at 24 MiB/s: about 3 s, a dozen scrapes at 0.25 s.
        await pair.configure({}, {"max_bandwidth": 24 * MiB})
        with capture_logs() as logs:
            async with make_relay(pair.dst_port, metrics_listen=Address("127.0.0.1", 0)) as relay:
                assert relay.metrics_server is not None
                port = relay.metrics_server.port
                before = await scrape(port)
                assert get(before, "migtap_migrations_active") == 0
                assert not per_session(before, "migtap_migration_round")
                migrating = asyncio.ensure_future(
                    pair.migrate(f"tcp:127.0.0.1:{relay.port}", timeout_s=60)
                )
                during: list[Samples] = []
                while not migrating.done():
                    during.append(await scrape(port))
                    await asyncio.sleep(0.25)
                result = await migrating
                assert result.source["status"] == "completed", result.source
                async with asyncio.timeout(10):
                    while not relay.sessions_ended:
                        await asyncio.sleep(0.02)
                after = await scrape(port)
        await pair.assert_ram_identical()

    # During: the session's series are there and move.
    live = [s for s in during if per_session(s, "migtap_migration_transfer_rate_bytes")]
    assert len(live) >= 4, len(during)
    assert all(get(s, "migtap_migrations_active") == 1 for s in live)
    rates = [per_session(s, "migtap_migration_transfer_rate_bytes")[0] for s in live]
    assert len(set(rates)) >= 2, rates
    assert max(rates) > 4 * MiB  # at the cap of 24 MiB/s, give or take the bursts
    rounds = [per_session(s, "migtap_migration_round") for s in live]
    assert all(r == [1.0] for r in rounds[: len(rounds) // 2]), rounds  # the bulk round
    remaining = [v for s in live for v in per_session(s, "migtap_migration_remaining_bytes")]
    assert len(set(remaining)) >= 2, remaining
    assert remaining == sorted(remaining, reverse=True)  # the bulk round only shrinks
    sent = [get(s, "migtap_bytes_total", direction="src-to-dst") for s in live]
    assert sent == sorted(sent)
    assert sent[-1] > sent[0]
    source = {dict(labels)["source"] for (n, labels) in live[0] if dict(labels).get("session")}
    assert source == {"127.0.0.1"}

    # After: the counters equal the migration_summary; the per-session series are gone.
    m = migration_summary(logs)
    assert m["outcome"] == "completed"
    assert get(after, "migtap_migrations_total", outcome="completed") == 1
    assert get(after, "migtap_migrations_active") == 0
    assert get(after, "migtap_bytes_total", direction="src-to-dst") == m["bytes_src_to_dst"]
    assert get(after, "migtap_bytes_total", direction="dst-to-src") == m["bytes_dst_to_src"]
    for kind in ("normal", "zero", "xbzrle", "compressed"):
        assert get(after, "migtap_ram_pages_total", kind=kind) == m[f"ram_{kind}_pages"]
    assert m["ram_normal_pages"] == result.source["ram"]["normal"]  # QEMU's own count
    assert get(after, "migtap_migration_duration_seconds_count", outcome="completed") == 1
    assert get(after, "migtap_migration_duration_seconds_sum", outcome="completed") == (
        pytest.approx(m["duration_s"])
    )
    assert get(after, "migtap_migration_wire_downtime_seconds_count") == 1
    assert get(after, "migtap_migration_wire_downtime_seconds_sum") == pytest.approx(
        m["wire_downtime_ms"] / 1000
    )
    assert get(after, "migtap_parser_detached_total") == 0
    assert get(after, "migtap_capture_failed_total") == 0
    assert not [key for key in after if dict(key[1]).get("session")]
