"""Fixtures and helpers shared by tests/test_store_*.py.

Test modules import the fixtures they use (``from store_fixtures import ...``);
fixture functions are named ``_fixture_*`` and registered under short names so
importing them does not shadow the test arguments.

Real servers only: ``shared_redis`` is the Redis at $SCD_TEST_REDIS_URL
(default redis://127.0.0.1:6379/13, a dedicated DB) under a random key prefix
that is deleted on teardown; ``redis_servers`` starts test-owned redis-server
processes on free loopback ports for fault injection (kill, pause, maxmemory);
``redis_cluster`` starts a 3-node cluster with store/redis-local.sh.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from sgl_scd.store import Breaker, PrefixStore, StoreIdentity, StoreMetrics, Timeouts
from sgl_scd.store.backends import open_backend

REPO = Path(__file__).resolve().parents[1]
SHARED_REDIS_URL = os.environ.get("SCD_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REDIS_SERVER = shutil.which("redis-server")


def make_identity(**overrides: object) -> StoreIdentity:
    fields: dict[str, object] = {
        "producer_model": "demo/base-135m",
        "producer_revision": "rev-1",
        "tokenizer": "demo-tokenizer-v1",
        "page_size": 16,
        "codec_revision": "codec-r1",
        "dtype": "bfloat16",
    }
    fields.update(overrides)
    return StoreIdentity(**fields)  # type: ignore[arg-type]


def payloads_for(n: int, size: int, tag: bytes = b"") -> list[bytes]:
    """n distinct payloads of size bytes; tag makes sets from different writers differ."""
    out = []
    for i in range(n):
        head = tag + f"page-{i}-".encode()
        out.append((head * (size // len(head) + 1))[:size])
    return out


def token_ids(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 104729) % 151_000 for i in range(n)]


def make_store(url: str, identity: StoreIdentity | None = None, **kwargs: object) -> PrefixStore:
    """A PrefixStore with a private metrics registry, a fast breaker and per-call stats."""
    timeouts = kwargs.pop("timeouts", Timeouts(connect_s=0.2, op_s=0.5))
    kwargs.setdefault("metrics", StoreMetrics(CollectorRegistry()))
    kwargs.setdefault("breaker", Breaker(base_s=0.05, max_s=0.2))
    kwargs.setdefault("stats_flush_s", 0.0)
    backend = open_backend(url, timeouts)  # type: ignore[arg-type]
    return PrefixStore(backend, identity or make_identity(), **kwargs)  # type: ignore[arg-type]


def metric(store: PrefixStore, name: str, **labels: str) -> float:
    """Current value of a Prometheus sample of store's registry (0.0 if never set)."""
    value = store.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def free_port() -> int:
    """A loopback port that is free, with its cluster bus port (port + 10000) free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port pair found")


def raw_client(port: int, timeout_s: float = 2.0) -> redis.Redis:
    """A plain redis-py client for test setup and inspection, without redis-py's default
    retries with backoff (they would hide how fast a dead server is noticed)."""
    return redis.Redis(port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                       retry=Retry(NoBackoff(), 0))


def wait_for_ping(port: int, timeout_s: float = 10.0) -> None:
    client = raw_client(port, 0.2)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not answer in {timeout_s}s")
            time.sleep(0.05)
    finally:
        client.close()


class RedisServer:
    """A test-owned redis-server process (no persistence) on a loopback port."""

    def __init__(self, workdir: Path, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.workdir = workdir / f"redis-{self.port}"
        self.workdir.mkdir(parents=True)
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.args],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_ping(self.port)
        return self

    def client(self) -> redis.Redis:
        return raw_client(self.port)

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-run, like a crash."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung / very slow server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture(name="redis_servers")
def _fixture_redis_servers(tmp_path: Path) -> Iterator:
    """Factory: redis_servers(*extra_args) -> started RedisServer; all killed on teardown."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not on PATH")
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(tmp_path, args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture(name="shared_redis")
def _fixture_shared_redis() -> Iterator[tuple[str, str, redis.Redis]]:
    """(url, key_prefix, raw client) on the shared Redis; skips if unreachable; cleans up."""
    raw = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=2, socket_connect_timeout=1,
                               retry=Retry(NoBackoff(), 0))
    try:
        raw.ping()
    except redis.exceptions.RedisError as exc:
        raw.close()
        pytest.skip(f"shared Redis at {SHARED_REDIS_URL} is not reachable ({exc}); "
                    "set SCD_TEST_REDIS_URL to run these tests")
    prefix = f"scdtest-{uuid.uuid4().hex[:12]}"
    yield SHARED_REDIS_URL, prefix, raw
    keys = list(raw.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        raw.delete(*keys)
    raw.close()


@contextlib.contextmanager
def local_cluster(workdir: Path) -> Iterator[dict]:
    """A 3-node Redis Cluster on free loopback ports, started and stopped by
    store/redis-local.sh. Yields {"url", "ports", "dir"}."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not on PATH")
    ports: list[int] = []
    while len(ports) < 3:
        p = free_port()
        if p not in ports:
            ports.append(p)
    env = dict(
        os.environ,
        SCD_REDIS_DIR=str(workdir),
        SCD_REDIS_CLUSTER_PORTS=" ".join(map(str, ports)),
        SCD_REDIS_MAXMEMORY="64mb",
    )
    script = str(REPO / "store" / "redis-local.sh")
    started = subprocess.run([script, "start", "cluster"], check=False, env=env, capture_output=True,
                             text=True, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        yield {"url": started.stdout.strip().splitlines()[-1], "ports": ports, "dir": workdir}
    finally:
        stopped = subprocess.run([script, "stop", "cluster"], check=False, env=env,
                                 capture_output=True,
                                 text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr


def kill_cluster_node(cluster: dict, port: int) -> None:
    """SIGKILL one node of a local_cluster (its pid file is written by redis-server)."""
    pid = int((Path(cluster["dir"]) / f"redis-{port}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    probe = raw_client(port, 0.2)
    try:
        for _ in range(100):
            try:
                probe.ping()
            except redis.exceptions.ConnectionError:
                return
            time.sleep(0.05)
    finally:
        probe.close()
    raise RuntimeError(f"cluster node {port} (pid {pid}) still answers after SIGKILL")


@pytest.fixture(name="redis_cluster", scope="module")
def _fixture_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A 3-node Redis Cluster shared by a test module (see local_cluster)."""
    with local_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster
