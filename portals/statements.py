"""The few statements the most frequent requests run, with their SQL built once per process.

The ORM compiles a query's SQL anew on every call. For a repeat launch (the request portals send most
often) that compiling cost more CPU than everything else the launch did: a locked read with three
correlated subqueries and four writes. Here the SQL of such a statement is built once per model and
column set, from the model's own table and column names, and the values still go through the fields
(encryption, dates, JSON) and the backend's converters, as they do through the ORM.

These writes send no `pre_save`/`post_save` signals; nothing in the product listens for them on the
models written here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from django.db import connection
from django.db.models import Field, Model

M = TypeVar("M", bound=Model)

Converter = Callable[[Any, Any, Any], Any]


def quote(name: str) -> str:
    return str(connection.ops.quote_name(name))


def column(model: type[Model], name: str, alias: str = "") -> str:
    """A field's column, quoted (and qualified by `alias`): for SQL written from the model's metadata."""
    qualified = quote(str(_fields(model, [name])[0].column))
    return f"{alias}.{qualified}" if alias else qualified


def table(model: type[Model]) -> str:
    return quote(model._meta.db_table)


def _fields(model: type[Model], names: Sequence[str]) -> list[Field[Any, Any]]:
    return [model._meta.pk if n == "pk" else model._meta.get_field(n) for n in names]  # type: ignore[misc]


@functools.cache
def _update_sql(model: type[Model], names: tuple[str, ...], where: tuple[str, ...]) -> str:
    sets = ", ".join(f"{column(model, n)} = %s" for n in names)
    conditions = " AND ".join(f"{column(model, n)} = %s" for n in ("pk", *where))
    return f"UPDATE {table(model)} SET {sets} WHERE {conditions}"  # noqa: S608 - names from metadata


def update(instance: Model, names: Sequence[str], **where: Any) -> int:
    """`instance.save(update_fields=names)` as one UPDATE of its row (`auto_now` fields set as save sets
    them), only where the row's `where` fields hold the given values. Returns the number of rows written."""
    model = type(instance)
    values = [
        field.get_db_prep_save(field.pre_save(instance, False), connection) for field in _fields(model, names)
    ]
    keys = [
        field.get_db_prep_value(value, connection)
        for field, value in zip(_fields(model, ["pk", *where]), [instance.pk, *where.values()], strict=True)
    ]
    with connection.cursor() as cursor:
        cursor.execute(_update_sql(model, tuple(names), tuple(where)), [*values, *keys])
        return int(cursor.rowcount)


@functools.cache
def _insert_sql(model: type[Model], names: tuple[str, ...]) -> str:
    columns = ", ".join(column(model, n) for n in names)
    marks = ", ".join(["%s"] * len(names))
    returning = ""
    if connection.features.can_return_columns_from_insert:
        returning = f" RETURNING {column(model, 'pk')}"
    return f"INSERT INTO {table(model)} ({columns}) VALUES ({marks}){returning}"  # noqa: S608 - as above


def insert(instance: Model) -> None:
    """`instance.save(force_insert=True)` for a model with an automatic primary key, as one INSERT of
    its other fields (`auto_now_add` fields set as save sets them); the new primary key is set."""
    model = type(instance)
    fields = [f for f in model._meta.concrete_fields if f is not model._meta.pk]
    values = [field.get_db_prep_save(field.pre_save(instance, True), connection) for field in fields]
    sql = _insert_sql(model, tuple(f.name for f in fields))
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        if connection.features.can_return_columns_from_insert:
            pk = cursor.fetchone()[0]
        else:
            pk = connection.ops.last_insert_id(cursor, model._meta.db_table, model._meta.pk.column)  # type: ignore[union-attr]
    instance.pk = pk
    instance._state.adding = False
    instance._state.db = connection.alias


@functools.cache
def _reader(
    model: type[Model], names: tuple[str, ...]
) -> tuple[list[str], list[tuple[Any, list[Converter]]]]:
    """The attribute names and, per column, what the ORM would apply to it (the backend's converters,
    then the field's own)."""
    fields = _fields(model, names)
    order = [f.attname for f in model._meta.concrete_fields]
    attnames = [f.attname for f in fields]
    if attnames != sorted(attnames, key=order.index):
        raise ValueError("fetch_one: name the fields in the model's order")  # Model.from_db expects it
    columns = []
    for field in fields:
        col = field.get_col(model._meta.db_table)
        columns.append((col, [*connection.ops.get_db_converters(col), *col.get_db_converters(connection)]))
    return attnames, columns


def fetch_one(
    model: type[M],
    sql: str,
    params: Sequence[Any],
    names: Sequence[str],
    *,
    related: tuple[str, Sequence[str]] | None = None,
) -> M | None:
    """The first row of `sql` as a `model` instance: its leading columns are the fields `names`, in the
    model's order (the other fields are deferred: read if asked for). `related` (a foreign key and the
    fields of its model, in that model's order, the primary key among them) reads the row it points to
    from the next columns, as `select_related` would. Each further column becomes an attribute named
    by the column's alias."""
    attnames, columns = _reader(model, tuple(names))
    link: Any = None
    if related is not None:
        link = model._meta.get_field(related[0])
        related_attnames, related_columns = _reader(link.related_model, tuple(related[1]))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None:
            return None
        width = len(names) + (len(related[1]) if related is not None else 0)
        extras = [c[0] for c in cursor.description[width:]]
    instance = model.from_db(connection.alias, attnames, _converted(row[: len(names)], columns))
    if related is not None:
        other = link.related_model.from_db(
            connection.alias, related_attnames, _converted(row[len(names) : width], related_columns)
        )
        link.set_cached_value(instance, other)
    for name, value in zip(extras, row[width:], strict=True):
        setattr(instance, name, value)
    return instance


def _converted(values: Sequence[Any], columns: list[tuple[Any, list[Converter]]]) -> list[Any]:
    out = list(values)
    for i, (col, converters) in enumerate(columns):
        for convert in converters:
            out[i] = convert(out[i], col, connection)
    return out


def lock_clause(alias: str) -> str:
    """` FOR UPDATE OF <alias>` where the database locks rows (only that table's row: what
    `select_for_update(of=("self",))` locks), nothing where it does not (SQLite)."""
    if connection.features.has_select_for_update_of:
        return f" FOR UPDATE OF {alias}"
    return " FOR UPDATE" if connection.features.has_select_for_update else ""
