"""SQL string normalisation for Spider-style exact match (no database is needed, or consulted).

What is normalised, and why each is safe under SQLite semantics:

- keyword and identifier case (SQLite identifiers and keywords are case-insensitive);
- whitespace, including around ``( ) , .`` and operators (``count ( * )`` == ``COUNT(*)``);
- quote style of string literals (``"x"`` -> ``'x'``; Spider writes values in either); literal text
  keeps its case, because SQLite compares strings case-sensitively;
- ``<>`` -> ``!=``, ``==`` -> ``=``, a trailing ``;``, backquote/bracket identifier quoting;
- table aliases: ``FROM singer AS T1 ... T1.name`` -> ``FROM singer ... singer.name`` when the table
  is aliased once; a self-joined table's aliases are renamed ``table_1, table_2`` in order of
  appearance; ``AS`` before a table alias is optional in SQL and handled both ways;
- a ``table.`` qualifier is dropped when the query mentions only one table.

Not normalised (a string match is stricter than Spider's component "exact set match" and much
stricter than execution accuracy): the order of SELECT columns, of AND-ed conditions, of JOINs,
numeric formats (``3`` vs ``3.0``), and equivalent but differently written queries.

>>> normalize_sql('SELECT T1.Name FROM singer AS T1 WHERE T1.Age  >  "30";')
"select name from singer where age > '30'"
>>> normalize_sql("SELECT T2.title FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id")
'select song.title from singer join song on singer.id = song.singer_id'
>>> normalize_sql("select song.title from singer join song on singer.id=song.singer_id")
'select song.title from singer join song on singer.id = song.singer_id'
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"""
    '(?:[^']|'')*'            # single-quoted string ('' escapes a quote)
  | "(?:[^"]|"")*"            # double-quoted string (a value in Spider)
  | `[^`]*` | \[[^\]]*\]      # quoted identifiers
  | \d+(?:\.\d+)?             # number
  | [A-Za-z_][A-Za-z0-9_$]*   # word
  | <> | != | >= | <= | == | \|\|
  | \S                        # any other single character
""", re.VERBOSE)

# words that can follow a table name in FROM/JOIN and so are never an alias
_CLAUSE = frozenset({"where", "join", "on", "group", "order", "limit", "having", "union", "intersect",
                     "except", "inner", "left", "right", "outer", "cross", "natural", "full", "as",
                     "using", "select", "from", "and", "or", "not", "by", "asc", "desc"})


def tokenize_sql(sql: str) -> list[str]:
    """Lower-cased tokens with string literals kept verbatim but single-quoted."""
    out = []
    for tok in _TOKEN.findall(sql.strip().rstrip(";").strip()):
        if tok[0] == '"':
            tok = "'" + tok[1:-1].replace('""', '"').replace("'", "''") + "'"
        elif tok[0] in "`[":
            tok = tok[1:-1].lower()
        elif tok[0] != "'":
            tok = {"<>": "!=", "==": "="}.get(tok, tok.lower())
        out.append(tok)
    return out


def _table_aliases(tokens: list[str]) -> tuple[dict[str, str], set[int], set[int]]:
    """alias -> replacement name, positions to drop, and positions of alias declarations."""
    found: list[tuple[str, str, int | None, int]] = []  # (table, alias, position of AS, position of alias)
    for i, tok in enumerate(tokens[:-1]):
        if tok not in ("from", "join") or not _is_word(tokens[i + 1]):
            continue
        as_pos = i + 2 if i + 2 < len(tokens) and tokens[i + 2] == "as" else None
        k = i + 3 if as_pos else i + 2
        if k < len(tokens) and _is_word(tokens[k]) and tokens[k] not in _CLAUSE:
            found.append((tokens[i + 1], tokens[k], as_pos, k))
    per_table: dict[str, list[str]] = {}
    for table, alias, _, _ in found:
        per_table.setdefault(table, []).append(alias)
    rename = {alias: table if len(aliases) == 1 else f"{table}_{n}"
              for table, aliases in per_table.items() for n, alias in enumerate(aliases, start=1)}
    drop = {as_pos for _, _, as_pos, _ in found if as_pos is not None}  # AS before a table alias is optional
    drop |= {k for table, _, _, k in found if len(per_table[table]) == 1}  # the alias is replaced by the table
    return rename, drop, {k for *_, k in found}


def _is_word(tok: str) -> bool:
    return bool(re.fullmatch(r"[a-z_][a-z0-9_$]*", tok))


def normalize_sql(sql: str) -> str:
    """Canonical text of a SQL query for string exact match (see the module docstring for what changes)."""
    tokens = tokenize_sql(sql)
    rename, drop, declared = _table_aliases(tokens)
    out: list[str] = []
    for i, tok in enumerate(tokens):
        if i in drop:
            continue
        if tok in rename and (i in declared or (i + 1 < len(tokens) and tokens[i + 1] == ".")):
            tok = rename[tok]
        out.append(tok)
    tables = {out[i + 1] for i, t in enumerate(out[:-1]) if t in ("from", "join")}
    if len(tables) == 1:  # one table: "singer.name" and "name" mean the same column
        (table,) = tables
        out = [t for i, t in enumerate(out)
               if not (t == table and i + 1 < len(out) and out[i + 1] == ".")
               and not (t == "." and i and out[i - 1] == table)]
    return " ".join(out).replace(" . ", ".")
