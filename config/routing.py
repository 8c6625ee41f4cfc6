"""Which Celery queue each task goes to: one table (`ROUTES`), read by Celery's router (`route_task`).

Two kinds of queue, so that no tenant's app work delays custody of any tenant's tokens:

- `${CELERY_QUEUE}.custody`: renewals (the sweep's batches, staff's), resolving interrupted renewals,
  uninstall confirmations and status checks, the renewal sweep itself. And `${CELERY_QUEUE}.custody.now`:
  renewals a web request is waiting for, taken before anything else on the custody queue.
- `${CELERY_QUEUE}.app`: the app's event handlers, offline pulls, bindings syncs, the event sweep,
  housekeeping, and any task of an app built on this backend that names no queue of its own.

A worker serves the queues it is given (`-Q`): `config/supervisord.conf` runs one for custody
(`custody.now,custody`) and one for the app. A worker given no `-Q` serves all of them. On Redis it takes
from the first that has a task in the order of `KindOrder` (custody.now first), whatever the order of `-Q`.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from kombu import Queue

CUSTODY_NOW = "custody.now"
CUSTODY = "custody"
APP = "app"

ROUTES: dict[str, str] = {
    # custody
    "portals.tasks.renew_pair_task": CUSTODY,  # CUSTODY_NOW when a web request waits (trigger on_demand)
    "portals.tasks.renew_pairs_task": CUSTODY,
    "portals.tasks.resolve_attempt_task": CUSTODY,
    "portals.tasks.carry_out_task": CUSTODY,  # APP for a bindings sync (kind bind_events)
    "portals.tasks.sweep_due_pairs": CUSTODY,
    "portals.tasks.resolve_interrupted": CUSTODY,  # beat, every minute
    "portals.tasks.payment_hint_task": CUSTODY,  # an anonymous ONAPPPAYMENT: look the portal up, check it
    "install.tasks.apply_deferred_task": CUSTODY,  # install and update events kept while unverifiable
    # the app's work
    "events.tasks.handle_event_task": APP,
    "events.tasks.pull_offline_task": APP,
    "events.tasks.sweep_events": APP,
    "install.tasks.purge_inbound_log": APP,
}
# Arguments that move a task within its kind: (task, position, keyword, value) → queue.
ON_DEMAND = "on_demand"  # portals.models.RenewalTrigger.ON_DEMAND
BIND_EVENTS = "bind_events"  # portals.models.WantedKind.BIND_EVENTS


KINDS = (CUSTODY_NOW, CUSTODY, APP)


def queue_name(kind: str, base: str | None = None) -> str:
    return f"{base or settings.CELERY_TASK_DEFAULT_QUEUE}.{kind}"


def queues(base: str) -> list[Queue]:
    """Every queue of the deployment `base` (CELERY_QUEUE), in the order a worker without `-Q` serves them.
    Last, the deployment's bare queue: where releases before the split queued everything, drained still."""
    # Each bound by its own name: queues sharing a routing key would each get a copy of every task.
    names = [*(queue_name(kind, base) for kind in KINDS), base]
    return [Queue(name, routing_key=name) for name in names]


class KindOrder:
    """The order a worker takes from its queues, for kombu's transports (`queue_order_strategy`):
    custody.now, custody, any other (the bare queue), app. kombu keeps a worker's queues in a set, so
    its own "priority" order is the set's (arbitrary) and "sorted" puts `custody` before `custody.now`:
    a renewal a web request waits for would wait behind a sweep's batches."""

    def __init__(self, it: Any = None) -> None:
        self.items: list[str] = list(it or [])

    def update(self, it: Any) -> None:
        self.items[:] = sorted(it, key=_rank)

    def consume(self, n: int) -> list[str]:
        return self.items[:n]

    def rotate(self, last_used: str) -> None:
        """Never: the order is fixed."""


def _rank(queue: str) -> tuple[int, str]:
    for rank, kind in ((0, CUSTODY_NOW), (1, CUSTODY), (3, APP)):
        if queue.endswith(f".{kind}"):
            return rank, queue
    return 2, queue  # the deployment's bare queue (releases before the split), or a queue of the app's own


def kind_of(name: str, args: Any = (), kwargs: Any = None) -> str:
    kwargs = kwargs or {}
    kind = ROUTES.get(name, APP)
    if name == "portals.tasks.renew_pair_task":
        trigger = args[1] if len(args) > 1 else kwargs.get("trigger")
        if trigger == ON_DEMAND:
            return CUSTODY_NOW
    if name == "portals.tasks.carry_out_task" and kwargs.get("kind") == BIND_EVENTS:
        return APP
    return kind


def route_task(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
) -> dict[str, str]:
    """Celery's router (CELERY_TASK_ROUTES): the queue of `name` per the table."""
    return {"queue": queue_name(kind_of(name, args, kwargs))}
