"""The benchmark's app (bench/noisy_neighbour.py): one handler that makes one REST call, as the issue's
"app handlers that make one REST call"."""

from portals.registry import on


@on("ONCRMDEALADD")
def read_the_deal(event):  # type: ignore[no-untyped-def]
    event.client.call("crm.deal.get", {"id": event.object_id})
