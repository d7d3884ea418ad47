"""The 2-D table of a typed file (features down, ids across), as text and html."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .typed_file import TypedFile

__all__ = ["table_rows", "text_table", "html_table"]

MAX_IDS = 5


def _cell(refs: np.ndarray, position: int, trailing: tuple[int, ...]) -> str:
    start, stop = refs[position]
    return "None" if start < 0 else str((int(stop - start), *trailing))


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def table_rows(file: TypedFile, max_ids: int = MAX_IDS) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table: one row per feature, the first ``max_ids`` ids across."""
    ids = file.ids
    shown = ids[:max_ids].tolist()
    header = ["feature", "dtype", "rows", "ids with data", "stored", *shown]
    if len(ids) > max_ids:
        header.append(f"... {len(ids) - max_ids} more ids")
    rows = []
    for path, proxy in file.features.items():
        node = file._layout()[path]
        row = [path, str(node.dtype), str(node.shape[0]) if node.shape else "0"]
        if proxy.has_refs:
            refs = proxy.refs.array
            row.append(str(int((refs[:, 0] >= 0).sum())))
            trailing = node.shape[1:]
            cells = [_cell(refs, i, trailing) for i in range(len(shown))]
        else:
            row.append("-")
            cells = ["-"] * len(shown)
        compression = f" ({node.compression})" if node.compression else ""
        row.append(_size(node.nbytes_stored) + compression)
        rows.append(row + cells + ([""] if len(ids) > max_ids else []))
    return header, rows


def text_table(file: TypedFile, max_ids: int = MAX_IDS) -> str:
    """The table as aligned text, under a title line."""
    header, rows = table_rows(file, max_ids)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"<{type(file).__qualname__} {file.filename!r}: {len(file.ids)} ids>"]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if not rows:
        lines.append("(no features hold data yet)")
    return "\n".join(lines)


def html_table(file: TypedFile, max_ids: int = MAX_IDS) -> str:
    """The table as an html fragment, for Jupyter."""
    header, rows = table_rows(file, max_ids)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    title = html.escape(f"{type(file).__qualname__} {file.filename!r}: {len(file.ids)} ids")
    return f"<div><b>{title}</b><table><tr>{head}</tr>{body}</table></div>"
