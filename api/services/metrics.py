"""Prometheus metrics (GET /metrics).

Read from the database at scrape time, so every API replica reports the same numbers and nothing is
lost when a worker dies: jobs by state, queue depth (queued jobs per target queue), and a histogram
of job run time (last start to end) by final state. Counted in this process: bytes uploaded, by kind
(model / dataset).
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from core.db import session_scope
from core.models.job import JobState
from core.repos import JobRepo
from core.targets import QUEUES

DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
REGISTRY = CollectorRegistry(auto_describe=True)
UPLOADED_BYTES = Counter("featherweight_uploaded_bytes", "Bytes received in accepted uploads", ["kind"],
                         registry=REGISTRY)


class JobCollector(Collector):
    def describe(self) -> list[object]:
        return []  # no query at registration (import time); the families appear on collect

    def collect(self) -> Iterator[object]:
        with session_scope() as session:
            jobs = JobRepo(session)
            by_state, queued, runs = jobs.count_by_state(), jobs.queued_by_target(), jobs.run_seconds()
        states = GaugeMetricFamily("featherweight_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            states.add_metric([state.value], by_state.get(state.value, 0))
        yield states
        depth = GaugeMetricFamily("featherweight_queue_depth", "Queued jobs per target queue", labels=["queue"])
        for name in QUEUES:
            depth.add_metric([name], queued.get(name, 0))
        yield depth
        duration = HistogramMetricFamily("featherweight_job_duration_seconds",
                                         "Run time of finished jobs (last start to end)", labels=["state"])
        for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
            seconds = sorted(s for st, s in runs if st == state.value)
            buckets = [(str(b), bisect.bisect_right(seconds, b)) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", len(seconds)))
            duration.add_metric([state.value], buckets, sum(seconds))
        yield duration


REGISTRY.register(JobCollector())


def render() -> bytes:
    return generate_latest(REGISTRY)


def count_upload(kind: str, size: int) -> None:
    UPLOADED_BYTES.labels(kind=kind).inc(size)
