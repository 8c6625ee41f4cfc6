"""A portal's records: ``<entity>.list`` / ``.add`` / ``.get`` / ``.update`` / ``.delete`` over its items, CRM
entities shaped by ``crm.py`` (settings/how-to-call-rest-api/list-methods-pecularities.md for the pages)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from . import crm
from .base import RestError as _RestError
from .base import iso as _iso
from .common import (
    JSON,
    PAGE_SIZE,
)
from .state import PortalState


class RecordsMixin(PortalState):
    """The portal's items and the entity methods over them."""

    def seed(self, entity: str = "crm.contact", n: int = 120) -> None:
        """Add ``n`` items to ``entity`` (IDs continue from the highest one), making ``entity.*`` callable."""
        with self._lock:
            rows = self.items.setdefault(entity, [])
            first = self._max_id(entity) + 1
            created = _iso(self.standin.now())
            for number in range(first, first + n):
                rows.append(
                    {
                        "ID": str(number),
                        "TITLE": f"{entity} #{number}",
                        "NAME": f"Name{number}",
                        "LAST_NAME": f"Seeded{number}",
                        "DATE_CREATE": created,
                    }
                )

    def _max_id(self, entity: str) -> int:
        return max((int(row["ID"]) for row in self.items.get(entity, [])), default=0)

    def _entity_list(self, entity: str, params: JSON) -> tuple[Any, JSON]:
        """List methods (settings/how-to-call-rest-api/list-methods-pecularities.md): 50 a page, ``start``
        picks the page, the answer carries ``next`` (when more follow) and ``total``. ``start=-1`` is the fast
        path for big exports: no count, no ``next``, the caller pages by ``filter[>ID]``."""
        try:
            start = int(params.get("start") or 0)
        except (TypeError, ValueError):
            start = 0
        # Either case (the docs write `filter`, their examples and many callers `FILTER`).
        raw_filter = params.get("filter", params.get("FILTER"))
        raw_order = params.get("order", params.get("ORDER"))
        filters: JSON = raw_filter if isinstance(raw_filter, dict) else {}
        order: JSON = raw_order if isinstance(raw_order, dict) else {}
        select = params.get("select", params.get("SELECT"))
        with self._lock:
            rows = [dict(row) for row in self.items[entity] if crm.matches(row, filters)]
        field, direction = next(iter(order.items()), ("ID", "ASC"))

        def sort_key(row: JSON) -> tuple[int, float, str]:
            value: Any = row.get(str(field))
            try:
                return (0, float(value), "")
            except (TypeError, ValueError):
                return (1, 0.0, str(value))

        rows.sort(key=sort_key, reverse=str(direction).upper() == "DESC")
        if isinstance(select, list) and select and "*" not in select:
            wanted = {str(name) for name in select} | {"ID"}  # ID always: the fast path pages by it
            rows = [{k: v for k, v in row.items() if k in wanted} for row in rows]
        if start == -1:
            return rows[:PAGE_SIZE], {}
        start = max(start, 0)
        extra: JSON = {}
        if start + PAGE_SIZE < len(rows):
            extra["next"] = start + PAGE_SIZE
        extra["total"] = len(rows)
        return rows[start : start + PAGE_SIZE], extra

    @staticmethod
    def _id_param(params: JSON) -> str:
        value = params.get("id", params.get("ID"))
        if value in (None, ""):
            raise _RestError(400, "ERROR_ARGUMENT", "ID is not defined or invalid.")
        return str(value)

    @staticmethod
    def _fields_param(params: JSON) -> JSON:
        fields = params.get("fields", params.get("FIELDS"))
        if not isinstance(fields, dict):
            raise _RestError(400, "ERROR_ARGUMENT", "Parameter 'fields' must be an object.")
        return fields

    def _moment(self) -> datetime:
        return datetime.fromtimestamp(self.standin.now(), tz=UTC).astimezone()

    def _entity_add(self, entity: str, params: JSON, user_id: int = 1) -> int:
        fields = self._fields_param(params)
        with self._lock:
            new_id = self._max_id(entity) + 1
            if crm.handles(entity):
                self.items[entity].append(
                    crm.new_record(entity, new_id, fields, user_id=user_id, now=self._moment())
                )
            else:
                row = {key: value for key, value in fields.items() if key != "ID"}
                self.items[entity].append({"ID": str(new_id), **row})
        if self.write_delay > 0:
            time.sleep(self.write_delay)  # the write has landed; only the answer is late
        return new_id

    def _find(self, entity: str, item_id: str) -> JSON:
        for row in self.items[entity]:
            if row["ID"] == item_id:
                return row
        # crm-deal-get.md (and contact, company, lead): HTTP 400, an empty error code, "Not found".
        raise _RestError(400, "", "Not found")

    def _entity_get(self, entity: str, params: JSON) -> JSON:
        item_id = self._id_param(params)
        with self._lock:
            return dict(self._find(entity, item_id))

    def _entity_update(self, entity: str, params: JSON, user_id: int = 1) -> bool:
        item_id = self._id_param(params)
        fields = self._fields_param(params)
        with self._lock:
            row = self._find(entity, item_id)
            if crm.handles(entity):
                crm.update_record(entity, row, fields, user_id=user_id, now=self._moment())
            else:
                row.update({key: value for key, value in fields.items() if key != "ID"})
        if self.write_delay > 0:
            time.sleep(self.write_delay)
        return True

    def _entity_delete(self, entity: str, params: JSON) -> bool:
        item_id = self._id_param(params)
        with self._lock:
            row = self._find(entity, item_id)
            self.items[entity].remove(row)
        return True
