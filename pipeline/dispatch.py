"""The Python entry point: send commands to their hosts and return per-command results.

Used by ingestion, backfills, notebooks and tests. Commands of one aggregate
keep their order: each host receives them in one batch, in input order, and a
resend after a failure is again in input order.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError

from pipeline.controller import CONTROLLER_NAME, Assignment
from pipeline.protocol import (
    FAILED,
    BatchItem,
    BatchRequest,
    BatchResult,
    CommandResult,
    shard_of,
)

logger = logging.getLogger(__name__)


class DispatchError(Exception):
    """Raised when commands are still not durable after every attempt."""


class Router:
    """Group commands by the host that owns their shard, per the controller.

    With ``namespace``, a Router whose controller has died looks up the
    controller now running under the same name in that namespace, so a
    restarted controller is found without a new Router.
    """

    def __init__(self, controller: Any, namespace: str | None = None) -> None:
        self._controller = controller
        self._namespace = namespace
        self.assignment: Assignment = ray.get(controller.get_assignment.remote())

    def refresh(self) -> Assignment:
        """Fetch the current assignment from the controller.

        Raises RayActorError when the controller is dead and no controller of
        the same name runs in ``namespace`` (or no namespace was given).
        """
        try:
            self.assignment = ray.get(self._controller.get_assignment.remote())
        except RayActorError:
            controller = self._find_controller()
            if controller is None:
                raise
            self.assignment = ray.get(controller.get_assignment.remote())
            self._controller = controller
            logger.info(
                "controller found again namespace=%s assignment_version=%d",
                self._namespace,
                self.assignment.version,
            )
        return self.assignment

    def _find_controller(self) -> Any:
        """Return the controller running now in ``namespace``, or None."""
        if self._namespace is None:
            return None
        try:
            return ray.get_actor(CONTROLLER_NAME, namespace=self._namespace)
        except ValueError:
            return None

    def host_of(self, aggregate_type: str, aggregate_id: str) -> str:
        """Return the id of the host owning the aggregate's shard."""
        shard_hosts = self.assignment.shard_hosts
        return shard_hosts[shard_of(aggregate_type, aggregate_id, len(shard_hosts))]

    def group(self, items: Sequence[BatchItem]) -> dict[str, list[int]]:
        """Return, per host id, the indices of ``items`` it owns, in input order."""
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            host_id = self.host_of(item.aggregate_type, item.command.aggregate_id)
            groups.setdefault(host_id, []).append(index)
        return groups

    def handle(self, host_id: str) -> Any:
        return self.assignment.hosts[host_id]


class Dispatcher:
    """Send batches and wait for them; resend what is not durable.

    ``dispatch`` blocks until every command is durable (appended, duplicate or
    rejected) or ``max_attempts`` rounds have passed; the last results of the
    commands still not durable are returned with status FAILED or NOT_OWNER.
    """

    def __init__(
        self,
        controller: Any,
        sender_id: str | None = None,
        max_attempts: int = 20,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.router = Router(controller)
        self.sender_id = sender_id or f"dispatch-{uuid.uuid4().hex[:8]}"
        self.epoch = 0
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s

    def dispatch(self, items: Sequence[BatchItem]) -> list[CommandResult]:
        """Execute ``items`` and return one result per item, in input order."""
        results: list[CommandResult | None] = [None] * len(items)
        pending = list(range(len(items)))
        backoff = self._backoff_s
        for attempt in range(self._max_attempts):
            self._send_round(items, pending, results)
            pending = [i for i in pending if not results[i].is_durable]  # type: ignore[union-attr]
            if not pending:
                break
            logger.info(
                "resending commands sender=%s attempt=%d pending=%d",
                self.sender_id,
                attempt + 1,
                len(pending),
            )
            time.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
            self.epoch += 1
            self.router.refresh()
        return [r for r in results if r is not None]

    def dispatch_strict(self, items: Sequence[BatchItem]) -> list[CommandResult]:
        """Like ``dispatch``, but raise DispatchError if any command is not durable."""
        results = self.dispatch(items)
        failed = [r for r in results if not r.is_durable]
        if failed:
            msg = (
                f"{len(failed)} commands are not durable after retries; first: "
                f"{failed[0].command_id} {failed[0].status} {failed[0].reason}"
            )
            raise DispatchError(msg)
        return results

    def _send_round(
        self,
        items: Sequence[BatchItem],
        pending: list[int],
        results: list[CommandResult | None],
    ) -> None:
        subset = [items[i] for i in pending]
        groups = self.router.group(subset)
        refs = {}
        for host_id, indices in groups.items():
            request = BatchRequest(
                self.sender_id, self.epoch, [subset[i] for i in indices]
            )
            refs[host_id] = self.router.handle(host_id).execute_batch.remote(request)
        for host_id, ref in refs.items():
            indices = groups[host_id]
            try:
                batch: BatchResult = ray.get(ref)
                answers = batch.results
            except RayActorError as error:
                logger.warning(
                    "host died during a batch host=%s error=%s",
                    host_id,
                    type(error).__name__,
                )
                answers = [
                    CommandResult(
                        subset[i].command.command_id, FAILED, reason="host died"
                    )
                    for i in indices
                ]
            for index, answer in zip(indices, answers, strict=True):
                results[pending[index]] = answer
