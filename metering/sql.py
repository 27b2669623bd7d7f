"""Named SQL: every statement lives in queries.sql under a `-- name: <name>` header and is loaded by name.

Statements take bind parameters ($1, $2, ...) only; nothing is ever formatted into SQL text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

QUERIES_FILE = Path(__file__).with_name("queries.sql")
_HEADER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


class Queries(Mapping[str, str]):
    def __init__(self, statements: Mapping[str, str]) -> None:
        self._statements = dict(statements)

    def __getitem__(self, name: str) -> str:
        try:
            return self._statements[name]
        except KeyError:
            raise KeyError(f"no query named {name!r} in {QUERIES_FILE.name}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._statements)

    def __len__(self) -> int:
        return len(self._statements)

    @classmethod
    def parse(cls, text: str) -> Queries:
        statements: dict[str, str] = {}
        headers = list(_HEADER.finditer(text))
        for index, header in enumerate(headers):
            end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
            body = text[header.end() : end].strip()
            name = header.group(1)
            if name in statements:
                raise ValueError(f"query {name!r} is defined twice in {QUERIES_FILE.name}")
            if not body:
                raise ValueError(f"query {name!r} in {QUERIES_FILE.name} is empty")
            statements[name] = body
        return cls(statements)

    @classmethod
    def load(cls, path: Path = QUERIES_FILE) -> Queries:
        return cls.parse(path.read_text(encoding="utf-8"))


QUERIES = Queries.load()
