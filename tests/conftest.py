"""Fixtures that start the real services the tests talk to.

Kafka is a Tansu broker, PostgreSQL is the server on 127.0.0.1:5432, S3 is a
moto server, and Ray is one local instance per session. The tests reach every
service on loopback only. A service that cannot start fails the test with the command
that starts it by hand.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError
from psycopg import sql

from tests.services import KafkaBroker


def _isolate_environment() -> None:
    """Keep every client in the test process and its children on loopback.

    This runs when pytest loads this module, before any test module can import
    Ray, boto3 or s3fs: Ray reads its settings at import time, and child
    processes (Ray workers among them) inherit the environment.
    """
    os.environ.update(
        {
            # Fake keys stop botocore's credential chain at the environment
            # provider, and the metadata switch keeps it off the instance
            # metadata address in any case.
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            # An S3 client built without an explicit endpoint gets this closed
            # loopback port, so it fails with "connection refused" in place of
            # reaching AWS.
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            # Ray otherwise sends usage statistics to an outside server.
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray 2.60 enables token authentication and keeps one token file
            # per user. A test that starts another Ray in a subprocess (the
            # demo, the cluster test) replaces that file, after which a new
            # process can no longer join the session's Ray (as `raysource top`
            # in the terminal test must). Every Ray here is on loopback only.
            "RAY_AUTH_MODE": "disabled",
            # Set to 0 on Linux, this makes Ray take 127.0.0.1 as the node
            # address and bind its servers there, not on the outside address.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
    )
    for variable in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        os.environ.pop(variable, None)


_isolate_environment()

REPO_ROOT = Path(__file__).resolve().parent.parent
RETAIL_PARQUET_NAME = "online_retail_2010_2011.parquet"

POSTGRES_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
POSTGRES_START_COMMAND = (
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
)

RAY_OBJECT_STORE_BYTES = 300 * 1024 * 1024

S3_REGION = "us-east-1"
S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"

TopicFactory = Callable[..., str]


RAY_SESSION_OPTIONS: dict[str, Any] = {
    # "local" starts a new instance even when an earlier `ray start` left a
    # cluster address in /tmp/ray.
    "address": "local",
    "num_cpus": 4,
    "object_store_memory": RAY_OBJECT_STORE_BYTES,
    "include_dashboard": False,
    # Worker output reaches the test report, so a failing actor's log lines
    # show up beside the failing test.
    "log_to_driver": True,
}


class SessionRay:
    """The session's local Ray instance, started again after a shutdown.

    A test may shut down the Ray it runs on, and code under test that starts
    Ray itself (a CLI command run in the test process) shuts it down at its
    end. The next `.remote()` call then starts a Ray with Ray's default
    settings. A context kept from the first start would name a GCS that no
    longer listens, so a process that joins that address (`raysource top` in
    a terminal) would time out.
    """

    def __init__(self) -> None:
        self.context: Any = None

    def ensure_running(self) -> Any:
        """Return the context of this session's Ray, starting it if needed."""
        import ray

        if ray.is_initialized():
            if self.context is not None and (
                ray.get_runtime_context().gcs_address
                == self.context.address_info["gcs_address"]
            ):
                return self.context
            # Something other than this fixture started this Ray, such as
            # init_ray or a `.remote()` call, and with other settings.
            ray.shutdown()
        try:
            self.context = ray.init(**RAY_SESSION_OPTIONS)
        except Exception as err:
            # ray.init raises many exception types, and any of them means that
            # Ray did not start.
            pytest.fail(
                f"Ray failed to start: {err!r}. Reproduce outside pytest with: "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python -c 'import ray; "
                "ray.init(num_cpus=4, include_dashboard=False)'"
            )
        return self.context


@pytest.fixture(scope="session")
def session_ray() -> Iterator[SessionRay]:
    """Yield the session's Ray, not yet started, and shut it down at the end."""
    instance = SessionRay()

    yield instance

    import ray

    ray.shutdown()


@pytest.fixture
def ray_session(session_ray: SessionRay) -> Any:
    """Return the context of the session's local Ray, starting it if needed.

    Ray binds to 127.0.0.1 only, because `_isolate_environment` has set
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`. The instance has 4 CPUs and a 300 MiB
    object store. One instance serves every test unless a test shut it down or
    replaced it, and then the next test that requests this fixture gets a new
    one with the same settings.
    """
    return session_ray.ensure_running()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """Start a Tansu broker on a free loopback port and yield its bootstrap string.

    The broker keeps topics in memory and is stopped at the end of the session.
    """
    broker = KafkaBroker()
    try:
        bootstrap_servers = broker.start()
    except (FileNotFoundError, RuntimeError) as err:
        pytest.fail(f"Kafka broker (Tansu) failed to start: {err}")

    yield bootstrap_servers

    broker.stop()


@pytest.fixture
def kafka_topic(kafka_broker: str) -> Iterator[TopicFactory]:
    """Yield a function that creates a fresh topic and returns its name.

    Call it as `kafka_topic()` for 8 partitions or `kafka_topic(num_partitions)`.
    The topics are deleted after the test. Two Tansu 0.6.0 quirks: `end_offsets()`
    returns the first offset of the last record batch, not the offset after the
    last record, and describe-configs returns no topic configuration.
    """
    admin = KafkaAdminClient(
        bootstrap_servers=kafka_broker, client_id="raysource-test-admin"
    )
    created: list[str] = []

    def create_topic(num_partitions: int = 8) -> str:
        name = f"test-{uuid.uuid4().hex}"
        admin.create_topics(
            [NewTopic(name, num_partitions=num_partitions, replication_factor=1)]
        )
        created.append(name)
        return name

    yield create_topic

    try:
        if created:
            admin.delete_topics(created)
    except KafkaError as err:
        # The broker keeps topics only in memory, so a leftover costs memory
        # until the session ends and changes no result.
        warnings.warn(f"could not delete test topics {created}: {err!r}", stacklevel=1)
    finally:
        admin.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """Create a fresh PostgreSQL database and yield its SQLAlchemy URL.

    The database is `raysource_test_<random>` on postgres@127.0.0.1:5432 and is
    dropped at the end of the session. An unreachable server fails the test,
    in CI and elsewhere.
    """
    database = f"raysource_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(
            POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5
        ) as connection:
            connection.execute(
                sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database))
            )
    except psycopg.OperationalError as err:
        pytest.fail(
            f"PostgreSQL on 127.0.0.1:5432 is not reachable as user postgres: "
            f"{err}. Start it with: {POSTGRES_START_COMMAND}"
        )

    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"

    with psycopg.connect(
        POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5
    ) as connection:
        # FORCE terminates the connections still open on the database, such as
        # a pool a test did not dispose of, and then drops it (PostgreSQL 13+).
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(database)
            )
        )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start a moto S3 server on a free loopback port and yield its URL.

    The server runs in a thread of the test process and keeps buckets in memory.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        pytest.fail(
            f"moto's server mode is not installed: {err}. Install it with: "
            "pip install 'moto[server]'"
        )

    # Port 0 lets the operating system pick a free port at bind time, so no
    # other process can take it between choosing and binding.
    # NOTE: moto 5.2 binds in a background thread and start() waits for it
    # without a timeout, so a bind failure hangs until pytest-timeout ends the
    # test. A manual start is: python -m moto.server -H 127.0.0.1 -p PORT
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()

    yield f"http://{host}:{port}"

    server.stop()


@pytest.fixture
def s3_storage_options(s3_endpoint: str) -> dict[str, Any]:
    """Return fsspec and s3fs options that reach the moto server with fake keys."""
    return {
        "key": S3_ACCESS_KEY,
        "secret": S3_SECRET_KEY,
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": S3_REGION},
    }


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """Create a fresh bucket on the moto server, yield its name, then delete it."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    )
    bucket = f"raysource-test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)

    yield bucket

    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="session")
def retail_parquet() -> Path:
    """Return the path of the Online Retail Parquet file, or skip without it.

    The path is `RAYSOURCE_RETAIL_PARQUET` if that variable is set, else
    `shared/data/online_retail_2010_2011.parquet` in the folder that contains
    the repository.
    """
    configured = os.environ.get("RAYSOURCE_RETAIL_PARQUET")
    if configured:
        path = Path(configured)
    else:
        path = REPO_ROOT.parent / "shared" / "data" / RETAIL_PARQUET_NAME

    if not path.is_file():
        pytest.skip(
            f"Online Retail Parquet file not found at {path}; set "
            "RAYSOURCE_RETAIL_PARQUET to its path"
        )
    return path
