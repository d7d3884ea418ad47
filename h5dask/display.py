"""The 2-D table of a typed file (features down, ids across), as text and html.

The table reads only metadata, the first ids and the ref tables, in one
opening of the file: it never loads the whole id index, so it stays fast on
files of millions of ids. Only the first ``max_ids`` ids get a column; the
others are counted.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from numpy.dtypes import StringDType

from . import format as fmt

if TYPE_CHECKING:
    from .typed_file import TypedFile

__all__ = ["Table", "read_table", "table_rows", "text_table", "html_table"]

MAX_IDS = 5
MAX_ATTR_CHARS = 80
ROOT_ATTRS = ("format", "format_version")


@dataclass(frozen=True)
class Table:
    """What the display shows of a file, or of one group or feature of it."""

    title: str
    header: list[str]
    rows: list[list[str]]
    attrs: dict[str, dict[str, Any]]


def _cell(refs: np.ndarray, position: int, trailing: tuple[int, ...]) -> str:
    start, stop = refs[position]
    return "None" if start < 0 else str((int(stop - start), *trailing))


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _title(file: TypedFile, path: str, n_ids: int) -> str:
    name = repr(file.filename)
    if not path:
        return f"<{type(file).__qualname__} {name}: {n_ids} ids>"
    kind = file._layout().get(path)
    label = "Group" if kind is None or kind.kind == "group" else "Feature"
    return f"<{label} /{path} of {name}: {n_ids} ids>"


def _feature_row(
    f: h5py.File, path: str, node: fmt.Node, n: int, shown: int, allow_external: bool
) -> list[str]:
    row = [path, str(node.dtype), str(node.shape[0]) if node.shape else "0"]
    if node.other_files and not allow_external:  # described, never read
        files = ", ".join(node.other_files)
        return [*row, "-", f"in other files, not read: {files}", *["-"] * shown]
    if node.kind == "feature":
        refs = fmt.read_refs(f[path], n, allow_external)
        row.append(str(int((refs[:, 0] >= 0).sum())))
        cells = [_cell(refs, i, node.shape[1:]) for i in range(shown)]
    else:
        row.append("-")
        cells = ["-"] * shown
    compression = f" ({node.compression})" if node.compression else ""
    row.append(_size(node.nbytes_stored) + compression)
    return row + cells


def _attrs(f: h5py.File, paths: list[str]) -> dict[str, dict[str, Any]]:
    out, reached = {}, {}
    for path in paths:
        obj = fmt.hard_get(f, path, reached)  # never through a soft or external link
        attrs = fmt.read_attrs(obj) if obj is not None else {}
        if not path:
            attrs = {k: v for k, v in attrs.items() if k not in ROOT_ATTRS}
        if attrs:
            out[path or "/"] = attrs
    return out


def read_table(file: TypedFile, max_ids: int = MAX_IDS, path: str = "") -> Table:
    """The table of ``file``, or of the group or feature at ``path``, in one read.

    Parameters
    ----------
    file : TypedFile
        The file to describe.
    max_ids : int
        How many ids get a column; the others are counted in the last column.
    path : str
        A group or feature of the file; ``""`` for the whole file.
    """
    path = path.strip("/")
    file.flush()
    layout = file._layout()
    leaves = [p for p, node in layout.items() if node.kind != "group" and _under(p, path)]
    groups = [p for p, node in layout.items() if node.kind == "group" and _under(p, path)]
    allow = file.allow_external
    with file._handle.open() as f:
        n = fmt.n_ids(f)
        first = fmt.check_local(f[fmt.IDS], allow)[:max_ids] if n else []
        shown = np.array(first, dtype=StringDType()).tolist()
        rows = [_feature_row(f, p, layout[p], n, len(shown), allow) for p in leaves]
        with_attrs = [p for p in groups + leaves if layout[p].n_attrs]  # most have none
        attrs = _attrs(f, [path] * (path not in layout) + with_attrs)
    header = ["feature", "dtype", "rows", "ids with data", "stored", *shown]
    if n > len(shown):
        header.append(f"... {n - len(shown)} more ids")
        rows = [row + [""] for row in rows]
    return Table(_title(file, path, n), header, rows, attrs)


def table_rows(
    file: TypedFile, max_ids: int = MAX_IDS, path: str = ""
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table: one row per feature, the first ``max_ids`` ids across."""
    table = read_table(file, max_ids, path)
    return table.header, table.rows


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_ATTR_CHARS else text[: MAX_ATTR_CHARS - 3] + "..."


def text_table(file: TypedFile, max_ids: int = MAX_IDS, path: str = "") -> str:
    """The table as aligned text, under a title line and above the attributes.

    Examples
    --------
    >>> print(text_table(file))  # doctest: +SKIP
    <Experiment 'experiment.h5': 2 ids>
    feature      dtype    rows  ids with data  stored   planes/01.jpeg  train
    data/images  uint8    1     1              3.0 KiB  (1, 32, 32)     None
    logs/loss    float64  100   1              1.0 KiB  None            (100,)
    """
    table = read_table(file, max_ids, path)
    rows = [table.header, *table.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table.header))]
    lines = [table.title]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not table.rows:
        lines.append("(no features hold data yet)")
    for owner, attrs in table.attrs.items():
        pairs = ", ".join(f"{k}={_short(v)}" for k, v in attrs.items())
        lines.append(f"attrs of {owner}: {pairs}")
    return "\n".join(lines)


def html_table(file: TypedFile, max_ids: int = MAX_IDS, path: str = "") -> str:
    """The table as an html fragment, for Jupyter; attributes fold under it."""
    table = read_table(file, max_ids, path)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows
    )
    items = "".join(
        f"<li><code>{html.escape(owner)}</code>: "
        + ", ".join(f"{html.escape(k)}={html.escape(_short(v))}" for k, v in attrs.items())
        + "</li>"
        for owner, attrs in table.attrs.items()
    )
    details = f"<details><summary>attrs</summary><ul>{items}</ul></details>" if items else ""
    title = html.escape(table.title)
    return f"<div><b>{title}</b><table><tr>{head}</tr>{body}</table>{details}</div>"
