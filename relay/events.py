"""From an outbox.events row as pgoutput sent it to the contract's RawRow. Pure."""
from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter

from outbox.contract import ContractError, RawRow
from outbox.relay import pgoutput

REQUIRED = ("id", "aggregatetype", "aggregateid", "type", "payload")
OPTIONAL = ("origin", "traceparent")


class RowReader:
    """Reads RawRows straight from the undecoded values of one relation (outbox.events).

    Built once per Relation message: the column positions are looked up then, so each row
    costs one ``itemgetter`` call instead of a column-name dict (the relay's hot path).
    """

    __slots__ = ("_get", "_names", "_width", "_positional")

    def __init__(self, relation: pgoutput.Relation) -> None:
        names = [column.name for column in relation.columns]
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise ContractError(f"relation {relation.namespace}.{relation.name} lacks column(s) {', '.join(missing)}"
                                " of outbox.events")
        wanted = REQUIRED + tuple(c for c in OPTIONAL if c in names)
        self._names = wanted
        self._get = itemgetter(*(names.index(c) for c in wanted))
        self._width = len(names)
        self._positional = len(wanted) == len(REQUIRED) + len(OPTIONAL)  # RawRow's field order

    def __call__(self, values: Sequence[pgoutput.RawValue]) -> RawRow:
        if len(values) != self._width:
            raise pgoutput.ProtocolError(f"tuple has {len(values)} values but outbox.events has {self._width} columns")
        picked = self._get(values)
        if None in picked[:5] or pgoutput.UNCHANGED_TOAST in picked:
            # never on INSERT with the shipped schema; a guard against a hand-edited table or a future format
            bad = [name for name, value in zip(self._names, picked)
                   if value is pgoutput.UNCHANGED_TOAST or (value is None and name in REQUIRED)]
            raise ContractError(f"outbox row lacks {', '.join(bad)}")
        if self._positional:
            return RawRow(*picked)
        return RawRow(**dict(zip(self._names, picked)))

