"""Sets of byte ranges: which parts of a partial download are already on disk."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class RangeSet:
    """Disjoint, sorted, half-open [start, end) byte ranges; adjacent ranges are merged."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._ranges: list[tuple[int, int]] = []
        for start, end in ranges:
            self.add(start, end)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self._ranges == other._ranges

    def __repr__(self) -> str:
        return f"RangeSet({self._ranges!r})"

    def add(self, start: int, end: int) -> None:
        """Mark [start, end) as present."""
        if end <= start:
            return
        if self._ranges and self._ranges[-1][0] <= start <= self._ranges[-1][1]:  # the common case: appending
            self._ranges[-1] = (self._ranges[-1][0], max(end, self._ranges[-1][1]))
            return
        merged: list[tuple[int, int]] = []
        placed = False
        for lo, hi in self._ranges:
            if hi < start:
                merged.append((lo, hi))
            elif end < lo:
                if not placed:
                    merged.append((start, end))
                    placed = True
                merged.append((lo, hi))
            else:
                start, end = min(start, lo), max(end, hi)
        if not placed:
            merged.append((start, end))
        self._ranges = sorted(merged)

    def covered(self) -> int:
        """How many bytes are present."""
        return sum(hi - lo for lo, hi in self._ranges)

    def prefix(self) -> int:
        """Length of the contiguous run starting at byte 0."""
        return self._ranges[0][1] if self._ranges and self._ranges[0][0] == 0 else 0

    def missing(self, total: int) -> list[tuple[int, int]]:
        """The gaps in [0, total)."""
        gaps = []
        cursor = 0
        for lo, hi in self._ranges:
            if lo > cursor:
                gaps.append((cursor, min(lo, total)))
            cursor = max(cursor, hi)
        if cursor < total:
            gaps.append((cursor, total))
        return [(lo, hi) for lo, hi in gaps if hi > lo]

    def to_list(self) -> list[list[int]]:
        """JSON-ready form."""
        return [[lo, hi] for lo, hi in self._ranges]


def split(gaps: Iterable[tuple[int, int]], chunk: int) -> list[tuple[int, int]]:
    """Cut each gap into pieces of at most `chunk` bytes, in file order."""
    pieces = []
    for lo, hi in gaps:
        for start in range(lo, hi, chunk):
            pieces.append((start, min(start + chunk, hi)))
    return pieces
