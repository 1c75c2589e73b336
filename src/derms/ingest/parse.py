"""Parse and validate batches of readings (JSON or CSV) with row-level errors.

Accepted shapes
---------------
* JSON rows: ``[{"series": "inv-17", "quantity": "p", "unit": "kW",
  "t": "2026-11-25T10:00:00Z", "value": 3.2}, ...]`` (``series`` may be called ``device``
  or ``meter``; ``quality`` optional, default 0), or ``{"readings": [...]}``.
* JSON object: one reading (the fields of a row).
* JSON columns: ``{"series": [...], "quantity": [...], "unit": [...], "t": [...],
  "value": [...]}`` — same fields, one list each (fastest).
* CSV: a header with ``series`` (or ``device``/``meter``), ``quantity``, ``unit``, ``t``
  (or ``timestamp``), ``value`` and optional ``quality``.

Rule for a bad batch: **all or nothing**. If any row is invalid, nothing of the batch is
accepted and every invalid row is reported (row number from 0 in the batch, field, reason);
the client fixes and resends (resending is safe: storage is idempotent). Timestamps must
carry a zone (``Z`` or ``±hh:mm``); values must be finite numbers (not booleans);
field names must not repeat (``series`` and its alias ``device`` together are refused);
quantity/unit pairs must be known
(:mod:`derms.ingest.units`); unknown series ids are rejected when a set of known ids is given.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from derms.errors import DermsError, InputError, StoreUnavailable
from derms.ingest.quality import Quality, out_of_range
from derms.ingest.units import QUANTITIES, canonical

log = logging.getLogger(__name__)

MAX_ROWS = 1_000_000
KnownSeries = Collection[str] | Callable[[np.ndarray], np.ndarray] | None
"""Ids a batch may name: a collection, or a function giving a mask of the known ids."""
# a time of day, then its zone: Z, ±hh, ±hhmm or ±hh:mm (ISO 8601); a date alone has none
_ZONE = r"[Tt ]\d{2}(?::?\d{2}){0,2}(?:[.,]\d+)?(?:Z|z|[+-]\d{2}(?::?\d{2})?)$"
_ALIASES = {"device": "series", "meter": "series", "series_id": "series", "timestamp": "t",
            "time": "t"}
_REQUIRED = ("series", "quantity", "t", "value")
_T_MIN_US = -62135596800 * 10**6  # 0001-01-01T00:00:00Z
_T_MAX_US = 253402300799999999  # 9999-12-31T23:59:59.999999Z
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_KEY_END = re.compile(rb'"[ \t\r\n]*:')  # ends every key (and maybe text in a string)


@dataclass(frozen=True, slots=True)
class RowError:
    """One problem in a batch: row (0-based), field, and why."""

    row: int
    field: str
    detail: str


@dataclass(frozen=True)
class ReadingBatch:
    """Validated readings as columns. ``t_us`` is microseconds since the Unix epoch (UTC);
    ``value`` is in the unit that ``quantity``'s name says."""

    series: np.ndarray
    quantity: np.ndarray
    t_us: np.ndarray
    value: np.ndarray
    quality: np.ndarray
    source: str = "api"

    def __len__(self) -> int:
        return len(self.value)

    @property
    def t(self) -> pd.DatetimeIndex:
        return pd.DatetimeIndex(pd.to_datetime(self.t_us, unit="us", utc=True))


class BatchError(InputError):
    """A batch with invalid rows; ``errors`` lists every one."""

    def __init__(self, errors: list[RowError], n_rows: int) -> None:
        self.errors, self.n_rows = errors, n_rows
        first = errors[0]
        bad = len({e.row for e in errors})
        more = f" ({len(errors)} problems)" if len(errors) > bad else ""
        super().__init__(f"{bad} invalid row(s) of {n_rows}{more}; first: row {first.row} "
                         f"{first.field}: {first.detail}")


@dataclass
class _Checker:
    errors: list[RowError] = field(default_factory=list)
    CAP = 1000  # rows listed per check

    def flag(self, mask: np.ndarray, name: str, detail_of) -> None:
        for r in np.flatnonzero(mask)[:self.CAP]:
            self.errors.append(RowError(int(r), name, detail_of(int(r))))


@dataclass(frozen=True, slots=True)
class JsonDocument:
    """A decoded JSON batch before validation: ``rows`` (a list of reading objects) or
    ``columns`` (field -> list); ``n_rows`` readings; ``keys`` the field names it uses."""

    rows: list | None
    columns: dict | None
    n_rows: int
    keys: tuple[str, ...]


def _no_repeats(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads`` hook: an object naming a field twice is refused (the last one
    silently won)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _v in pairs if k in seen or seen.add(k))
        raise InputError(f"a JSON object names the field {dup!r} twice")
    return out


def json_document(body: bytes | str) -> JsonDocument:
    """Decode a JSON batch (rows, columns or one reading object) without validating the
    readings; raises :class:`BatchError` / InputError for what is not such a batch."""
    raw = body if isinstance(body, bytes | bytearray) else body.encode("utf-8", "replace")
    if isinstance(body, bytes | bytearray):  # strictly: json.loads(bytes) lets UTF-8
        # encoded surrogates (b"\xed\xa0\x80") through as lone surrogates
        enc = "utf-8-sig" if body[:3] == b"\xef\xbb\xbf" else _json_encoding(body)
        try:
            body = bytes(body).decode(enc)
        except UnicodeDecodeError as exc:
            raise InputError(f"body is not valid JSON text: {exc}") from None
        if enc not in ("utf-8", "utf-8-sig"):  # the key count below reads UTF-8 bytes
            raw = body.encode("utf-8", "replace")
    try:
        doc = loads_unique(body, raw, _n_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError("body is not acceptable JSON: nested too deeply") from None
    if "\\u" in body and _SURROGATE.search(body.encode("utf-8", "replace")):
        try:  # an escaped UTF-16 surrogate that is not half of a pair is no character
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError("body is not acceptable JSON: a string holds a lone surrogate "
                             f"escape (\\u{ord(exc.object[exc.start]):04x})") from None
    if isinstance(doc, dict) and "readings" in doc:
        doc = doc["readings"]
    if isinstance(doc, dict):
        kinds = set(map(type, doc.values()))
        if doc and list not in kinds:
            doc = [doc]  # one reading object
        else:
            lengths = set(map(len, doc.values())) if kinds == {list} else {-1}
            if -1 in lengths or len(lengths) != 1:
                raise InputError("column-form JSON needs lists of equal length for every "
                                 "field")
            return JsonDocument(None, doc, lengths.pop(), tuple(doc))
    if isinstance(doc, list):
        if doc and not all(isinstance(r, dict) for r in doc):  # every such row, not the first
            raise BatchError([RowError(i, "*", "row is not a JSON object")
                              for i, r in enumerate(doc) if not isinstance(r, dict)], len(doc))
        keys = dict.fromkeys(k for r in doc for k in r) if len(doc) > 1 else (
            doc[0] if doc else {})
        return JsonDocument(doc, None, len(doc), tuple(keys))
    raise InputError("JSON body must be a list of readings or an object of columns")


class _JsonText:
    """A JSON string where a number belongs (``"value": "0.3"``): not a number, shown as
    given."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)


def _json_numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """JSON text in the value column is no number (README: a number field takes a JSON
    number, not "0.3"); CSV values are text by nature and are parsed as before."""
    col = frame["value"] if "value" in frame.columns else None
    if col is not None and col.dtype == object and str in set(map(type, col.to_numpy())):
        frame["value"] = pd.Series([_JsonText(v) if isinstance(v, str) else v for v in col],
                                   index=col.index, dtype=object)  # (None stays None)
    return frame


def loads_unique(text: str, utf8: bytes, n_keys: Callable[[Any], int]) -> Any:
    """``json.loads(text)``, refusing an object that names a field twice (InputError).

    ``utf8``: the text as UTF-8 bytes; ``n_keys(doc)``: keys of the decoded document
    (all, or a lower bound: fewer only costs the exact check). Every key of the text ends
    in a quote and a colon (so may text inside a string): as many of those as keys
    decoded means no object repeats one; otherwise the exact check (a hook per object,
    ≈ 2x the decode)."""
    doc = json.loads(text)
    if _key_ends(utf8) != n_keys(doc):
        doc = json.loads(text, object_pairs_hook=_no_repeats)
    return doc


def _key_ends(raw: bytes) -> int:
    """Matches of ``_KEY_END`` in ``raw`` (counted without the regex where no quote is
    followed by white space)."""
    if b'" ' in raw or b'"\t' in raw or b'"\r' in raw or b'"\n' in raw:
        return len(_KEY_END.findall(raw))
    return raw.count(b'":')


def _n_keys(doc) -> int:
    """Keys of the objects of a decoded batch's usual shapes (an object, a list of flat
    objects, an object of columns, ``{"readings": …}``), nested ones not counted. Every
    key of the text ends in a match of ``_KEY_END`` (so does text in a string that looks
    like it): as many matches as keys counted here means no object names a field twice
    (fewer keys here than matches only sends the document to the exact check)."""
    if isinstance(doc, dict):
        inner = doc.get("readings")
        return len(doc) + (_n_keys(inner) if isinstance(inner, list) else 0)
    if isinstance(doc, list):
        return sum(len(r) for r in doc if isinstance(r, dict))
    return 0


def _frame(docs: list[JsonDocument]) -> pd.DataFrame:
    """The raw readings of documents using the same fields, as one frame of Python objects
    (object columns: a value keeps the type its own document gave it)."""
    if len(docs) == 1 and docs[0].columns is not None:
        return pd.DataFrame(docs[0].columns, dtype=object)
    if all(d.rows is not None for d in docs):
        rows = docs[0].rows if len(docs) == 1 else [r for d in docs for r in d.rows]
        return pd.DataFrame(rows, columns=list(docs[0].keys), dtype=object)
    cols: dict[str, list] = {k: [] for k in docs[0].keys}
    for d in docs:
        if d.columns is not None:
            for k, col in cols.items():
                col.extend(d.columns.get(k, [None] * d.n_rows))
        else:
            for k, col in cols.items():
                col.extend(r.get(k) for r in d.rows)
    return pd.DataFrame(cols, dtype=object)


def parse_json(body: bytes | str, *, source: str = "api",
               known_series: KnownSeries = None) -> ReadingBatch:
    """Parse a JSON batch (rows, columns or one reading object); raises
    :class:`BatchError` / InputError."""
    return validate(_json_numbers(_frame([json_document(body)])), source=source,
                    known_series=known_series)


def validate_documents(docs: list[JsonDocument], *, source: str = "api",
                       known_series: KnownSeries = None
                       ) -> list[ReadingBatch | InputError]:
    """Validate many small documents (MQTT messages) at the cost of a few: documents with
    the same fields are validated as one frame (the checks are row by row), then split
    back. Returns, per document, its batch or the error it alone would have raised (row
    numbers its own). Equal to :func:`validate` of each document alone. Raises
    :class:`StoreUnavailable` when ``known_series`` fails (no document is at fault)."""
    out: list[ReadingBatch | InputError | None] = [None] * len(docs)
    groups: dict[frozenset, list[int]] = {}
    for i, d in enumerate(docs):
        groups.setdefault(frozenset(d.keys), []).append(i)
    for idx in groups.values():
        _validate_group(docs, idx, out, source, known_series)
    return out  # type: ignore[return-value]


def _validate_group(docs, idx: list[int], out: list, source: str,
                    known_series: KnownSeries) -> None:
    group = [docs[i] for i in idx]
    n = np.array([d.n_rows for d in group])
    if len(idx) == 1 or n.sum() > MAX_ROWS:
        for i in idx:
            try:
                out[i] = validate(_json_numbers(_frame([docs[i]])), source=source,
                                  known_series=known_series)
            except StoreUnavailable:
                raise
            except InputError as exc:
                out[i] = exc
            except Exception as exc:  # a defect of the checks: this document alone pays
                log.exception("validate_failed rows=%d", docs[i].n_rows)
                out[i] = InputError(f"payload not accepted: {exc!r}"[:500])
        return
    start = np.r_[0, np.cumsum(n)]
    try:
        batch = validate(_json_numbers(_frame(group)), source=source,
                         known_series=known_series)
    except BatchError as exc:
        rows = np.array([e.row for e in exc.errors])
        owner = np.searchsorted(start, rows, side="right") - 1
        if len(exc.errors) >= _Checker.CAP:  # a check's list may have been cut: each
            for i in idx:  # document alone (a batch this bad is validated the slow way)
                _validate_group(docs, [i], out, source, known_series)
            return
        bad = set(owner.tolist())
        for k in sorted(bad):
            mine = [RowError(e.row - int(start[k]), e.field, e.detail)
                    for e, o in zip(exc.errors, owner) if o == k]
            out[idx[k]] = BatchError(mine, int(n[k]))
        rest = [i for k, i in enumerate(idx) if k not in bad]
        if rest:
            _validate_group(docs, rest, out, source, known_series)
        return
    except InputError:  # a frame-level refusal: each document alone says its own
        for i in idx:
            _validate_group(docs, [i], out, source, known_series)
        return
    except StoreUnavailable:
        raise
    except Exception:  # a defect of the checks: each document alone, and only the ones
        log.exception("validate_failed documents=%d; one by one", len(idx))  # it hits pay
        for i in idx:
            _validate_group(docs, [i], out, source, known_series)
        return
    for k, i in enumerate(idx):
        sl = slice(int(start[k]), int(start[k + 1]))
        out[i] = ReadingBatch(series=batch.series[sl], quantity=batch.quantity[sl],
                              t_us=batch.t_us[sl], value=batch.value[sl],
                              quality=batch.quality[sl], source=source)


def _json_encoding(body: bytes) -> str:
    """The encoding of JSON bytes without a BOM (RFC 8259 / json.detect_encoding)."""
    if len(body) > 1 and body[0] in b"[{ \t\r\n" and body[1]:  # no BOM, no zero byte
        return "utf-8"
    return json.detect_encoding(body)


def parse_csv(text: str | bytes, *, source: str = "api",
              known_series: KnownSeries = None) -> ReadingBatch:
    """Parse a CSV batch (header required); raises :class:`BatchError` / InputError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("CSV body is not UTF-8") from None
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False,
                            skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        _structure(text)  # a BatchError naming the rows, when it can
        raise InputError(f"body is not readable CSV: {exc}") from None
    if not isinstance(frame.index, pd.RangeIndex):  # pandas made the first column the index
        _structure(text)
        raise InputError("CSV rows have more fields than the header (first data row: "
                         f"{len(frame.columns) + 1} or more against {len(frame.columns)})")
    header = [h.strip().lower() for h in next(csv.reader(io.StringIO(text.lstrip("\ufeff"))),
                                               [])]
    if len(set(header)) != len(header):
        raise InputError(f"CSV header repeats a name: {header}")
    return validate(frame, source=source, known_series=known_series)


def _structure(text: str) -> None:
    """Raise a :class:`BatchError` listing the data rows (0-based, as every other row
    error) that pandas could not read: more fields than the header, or a quote left open
    (one error, at the row it opens in; the rest of the body is in that field). Called
    only once pandas has refused the text; returns when it finds neither."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")), skipinitialspace=True,
                        strict=True)
    errors: list[RowError] = []
    row = -1
    try:
        header = next(reader, None)
        if not header:
            return
        for fields in reader:
            if not fields:  # a blank line (pandas skips it too)
                continue
            row += 1
            if len(fields) > len(header) and len(errors) < _Checker.CAP:
                errors.append(RowError(row, "*", f"{len(fields)} fields, the header has "
                                                 f"{len(header)}"))
    except csv.Error as exc:
        errors.append(RowError(row + 1, "*", f"not readable CSV ({exc}): a quote left "
                                             "open?"))
        row += 1
    if errors:
        raise BatchError(errors, row + 1)


def _numbers(col: pd.Series) -> np.ndarray:
    """Finite-or-NaN floats of a raw column: booleans, strings that are not numbers and
    integers beyond the float range become NaN (flagged by the caller)."""
    if col.dtype == bool:
        return np.full(len(col), np.nan)
    if col.dtype == object and bool in set(map(type, col.to_numpy())):
        col = col.map(lambda v: np.nan if isinstance(v, bool) else v)
    try:
        return pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
    except (OverflowError, TypeError, ValueError):
        def one(v):
            try:
                return float(v)
            except (OverflowError, TypeError, ValueError):
                return np.nan
        return np.array([one(v) for v in col], dtype=float)


def _text(col: pd.Series) -> np.ndarray:
    """A raw column as stripped strings ('' for missing) (object array)."""
    out = col.astype(object).where(col.notna(), "")
    return out.astype(str).str.strip().to_numpy(dtype=object)


def _distinct_text(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, texts)``: a raw column's distinct values as :func:`_text` gives them, and
    per row the index of its own (missing values: the last text, ''), so that checks run
    once per distinct value (a batch of many devices shares a few times and quantities)."""
    raw = col.to_numpy(dtype=object)
    if not set(map(type, raw)) <= {str, type(None)}:  # 1, 1.0 and True hash alike: per row
        return np.arange(len(raw)), np.append(_text(col), "")
    codes, uniq = pd.factorize(raw, use_na_sentinel=True)
    return codes, np.append(_text(pd.Series(uniq, dtype=object)), "")


def _shown(v) -> str:
    """A raw value for a message (numbers beyond the float range shortened)."""
    text = repr(v.item() if isinstance(v, np.generic) else v)
    return text if len(text) <= 40 else text[:37] + "..."


def validate(frame: pd.DataFrame, *, source: str = "api",
             known_series: KnownSeries = None) -> ReadingBatch:
    """Validate a frame of raw readings into a :class:`ReadingBatch` (all or nothing)."""
    raw_names = [str(c) for c in frame.columns]
    names_ = [_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in raw_names]
    dup = sorted({n for n in names_ if names_.count(n) > 1})
    if dup:
        which = {d: [r for r, n in zip(raw_names, names_) if n == d] for d in dup}
        raise InputError("fields name the same thing: " + "; ".join(
            f"{', '.join(map(repr, v))} all mean {d!r}" for d, v in which.items()))
    frame = frame.set_axis(names_, axis=1)
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        raise InputError(f"missing field(s): {', '.join(missing)}")
    n = len(frame)
    if n > MAX_ROWS:
        raise InputError(f"batch has {n} rows; at most {MAX_ROWS} per request")
    chk = _Checker()
    series = _text(frame["series"])
    blank = series == ""
    chk.flag(blank, "series", lambda r: "missing series id")
    if callable(known_series):
        try:
            known = np.asarray(known_series(series), dtype=bool)
        except DermsError:
            raise
        except Exception as exc:  # the store's id lookup failed: not the batch's fault
            raise StoreUnavailable(f"the ids readings may name could not be read: "
                                   f"{exc!r}"[:500]) from exc
    elif known_series is not None:
        known = pd.Series(series).isin(known_series).to_numpy()  # hashed, not np.isin
    if known_series is not None:
        chk.flag(~known & ~blank, "series", lambda r: f"unknown series id {series[r]!r}")

    unit = frame["unit"] if "unit" in frame.columns else pd.Series([""] * n, index=frame.index)
    qc, qt = _distinct_text(frame["quantity"])
    uc, ut = _distinct_text(unit)
    q_raw, u_raw = qt[qc], ut[uc]
    no_q = q_raw == ""
    chk.flag(no_q, "quantity", lambda r: "missing quantity")
    codes, uniq = pd.factorize(pd.Series(q_raw, dtype=object) + "\x1f" +
                               pd.Series(u_raw, dtype=object))  # one lookup per distinct pair
    names, factors = np.empty(len(uniq) + 1, dtype=object), np.full(len(uniq) + 1, np.nan)
    names[-1] = ""  # code -1 (pandas' missing) points here: never another row's pair
    for i, key in enumerate(uniq):
        try:
            names[i], factors[i] = canonical(*str(key).split("\x1f", 1))
        except InputError:
            names[i] = ""
    quantity, factor = names[codes], factors[codes]
    bad_q = np.isnan(factor) & ~no_q
    chk.flag(bad_q, "unit", lambda r: f"unknown quantity/unit {q_raw[r]!r}/{u_raw[r]!r}")

    raw_v = _numbers(frame["value"])
    bad_v = ~np.isfinite(raw_v)
    chk.flag(bad_v, "value", lambda r: f"{_shown(frame['value'].iloc[r])} is not a finite number")
    with np.errstate(over="ignore", invalid="ignore"):
        value = raw_v * factor
    chk.flag(~bad_v & ~bad_q & ~no_q & ~np.isfinite(value), "value",
             lambda r: f"{_shown(frame['value'].iloc[r])} {u_raw[r]} is beyond the float "
                       f"range once converted to {quantity[r]}")

    # times: checked and parsed once per distinct text, then given to each row
    tc, tt = _distinct_text(frame["t"])
    t_str = pd.Series(tt, dtype=object)
    no_zone_u = ~t_str.str.contains(_ZONE, regex=True).to_numpy()
    # a text without a zone that is no timestamp either is "not ISO 8601" (it said "no zone")
    # utc=True: a text the zone pattern misses may still carry an offset ("…00 +05:00"),
    # and pandas refuses naive and aware texts in one column ("Mixed timezones": a 500)
    naive_ok = pd.to_datetime(t_str.where(no_zone_u, None), errors="coerce", utc=True,
                              format="ISO8601").notna().to_numpy()[tc]
    no_zone = no_zone_u[tc]
    chk.flag(no_zone & naive_ok, "t",
             lambda r: f"timestamp {tt[tc[r]]!r} has no zone (use Z or ±hh:mm)")
    chk.flag(no_zone & ~naive_ok, "t",
             lambda r: f"timestamp {tt[tc[r]]!r} is not ISO 8601 with a zone (e.g. "
                       "2026-07-01T12:00:00Z)")
    t_u = pd.to_datetime(t_str.where(~no_zone_u, None).str.upper(),  # ISO 8601's 't', 'z'
                         utc=True, errors="coerce", format="ISO8601")
    t_na = t_u.isna().to_numpy()[tc]
    bad_t = t_na & ~no_zone
    chk.flag(bad_t, "t", lambda r: f"timestamp {tt[tc[r]]!r} is not ISO 8601")
    t_us = t_u.dt.tz_convert(None).to_numpy().astype("datetime64[us]").astype(np.int64)[tc]
    # the UTC instant must be a datetime (years 1..9999): pandas parses '0001-01-01+05:00'
    # to year 0 and '9999-12-31T23:59-05:00' to year 10000, which no reader can return
    out_t = ~t_na & ((t_us < _T_MIN_US) | (t_us > _T_MAX_US))
    chk.flag(out_t, "t", lambda r: f"timestamp {tt[tc[r]]!r} is out of range in UTC "
                                   "(years 1..9999)")

    if "quality" in frame.columns:
        raw_q = frame["quality"]
        absent = (raw_q.isna() | (raw_q.astype(str).str.strip() == "")).to_numpy()
        qual = _numbers(raw_q.where(~absent, 0))
        bad_qual = ~np.isfinite(qual) | (qual < 0) | (qual > 32767) | (qual != np.round(qual))
        chk.flag(bad_qual, "quality", lambda r: "quality must be an integer 0..32767")
        quality = np.nan_to_num(qual).astype(np.int16)
    else:
        quality = np.zeros(n, dtype=np.int16)

    # outside the quantity's physical range: stored, flagged OUT_OF_RANGE (readers of good
    # data, e.g. the monitor, skip it); one lookup per distinct quantity/unit pair
    out_range = out_of_range(value, names, codes)
    quality = np.where(out_range, quality | int(Quality.OUT_OF_RANGE), quality).astype(np.int16)

    if chk.errors:
        raise BatchError(sorted(chk.errors, key=lambda e: (e.row, e.field)), n)
    return ReadingBatch(series=series, quantity=quantity, t_us=t_us, value=value,
                        quality=quality, source=source)


__all__ = ["QUANTITIES", "BatchError", "JsonDocument", "ReadingBatch", "RowError",
           "json_document", "parse_csv", "parse_json", "validate", "validate_documents"]
