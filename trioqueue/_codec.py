"""Turning args objects into JSON and back, and computing unique keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._validate import (
    MAX_JSON_DEPTH,
    NUMERIC_MAX_DIGITS,
    RESERVED_METADATA_KEYS,
    check_json,
    check_metadata_keys,
    check_shape,
)
from .errors import ValidationError
from .job import AttemptError, InsertOpts, Job, JobState, UniqueOpts

if TYPE_CHECKING:
    from .driver.protocol import JobRow

__all__ = [
    "MAX_OUTPUT_BYTES",
    "args_to_dict",
    "decode_args",
    "dumps",
    "encode_args",
    "encode_metadata",
    "encode_output",
    "row_to_job",
    "unique_key",
    "unique_states_bits",
]

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_STRICT_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _c_dumps(allow_nan: bool = True) -> Callable[[Any], str] | None:
    """The C encoder behind ``_ENCODER.encode``, called directly: for the small objects of
    job args, ``JSONEncoder.encode``'s Python layers cost twice what the encoding does.
    Same output and errors (circular references included); None where there is no C
    encoder (then ``_ENCODER.encode`` is used).

    One encoder object per thread serves every call (making one costs as much as a small
    encoding). Its circular-reference markers are emptied after a successful encoding but
    may keep stale entries after a failed one, so a failure replaces it."""
    make = getattr(json.encoder, "c_make_encoder", None)
    basestring = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or basestring is None:
        return None

    def new() -> Any:
        return make({}, _ENCODER.default, basestring, None, ":", ",", False, False, allow_nan)

    local = threading.local()

    def encode(value: Any) -> str:
        encoder = getattr(local, "encoder", None)
        if encoder is None:
            encoder = local.encoder = new()
        try:
            return "".join(encoder(value, 0))
        except BaseException:
            local.encoder = new()
            raise

    return encode


_dumps: Callable[[Any], str] = _c_dumps() or _ENCODER.encode
_dumps_strict: Callable[[Any], str] = _c_dumps(allow_nan=False) or _STRICT_ENCODER.encode
"""For args and metadata: NaN and ±Infinity raise ValueError (jsonb refuses them)."""
_dumps_sorted = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode


def dumps(value: Any) -> str:
    return _dumps(value)


_SCALARS = (str, int, float, bool, type(None))


_field_readers: dict[type[Any], Callable[[Any], dict[str, Any]]] = {}


def _field_reader(cls: type[Any]) -> Callable[[Any], dict[str, Any]]:
    """A function returning ``{name: obj.name, ...}`` for ``cls``'s attrs fields, compiled
    once per class (a generic loop over the fields costs several times more per job)."""
    reader = _field_readers.get(cls)
    if reader is None:
        # attrs itself compiles code with these names, so they are identifiers.
        items = ", ".join(f"{f.name!r}: obj.{f.name}" for f in attrs.fields(cls))
        namespace: dict[str, Any] = {}
        exec(f"def read(obj):\n    return {{{items}}}\n", namespace)
        reader = _field_readers[cls] = namespace["read"]
    return reader


def _attrs_object(args: Any) -> tuple[dict[str, Any], bool]:
    """``attrs.asdict(args)``, fast when every field holds a plain JSON scalar (the usual
    case; then the flag is True); anything else (nested attrs classes, collections) goes
    through attrs."""
    data = _field_reader(type(args))(args)
    for value in data.values():
        if not isinstance(value, _SCALARS):
            return attrs.asdict(args), False
    return data, True


def _dataclass_object(args: Any) -> tuple[dict[str, Any], bool]:
    return dataclasses.asdict(args), False


def _mapping_object(args: Any) -> tuple[dict[str, Any], bool]:
    return dict(args), False


_Converter = Callable[[Any], tuple[dict[str, Any], bool]]


def _converter(cls: type[Any]) -> _Converter:
    """How to turn an instance of ``cls`` into its JSON object, and whether that object is
    known to be flat (str keys, scalar values); ValidationError if there is no way."""
    if attrs.has(cls):
        return _attrs_object
    if dataclasses.is_dataclass(cls):
        return _dataclass_object
    if issubclass(cls, Mapping):
        return _mapping_object
    raise ValidationError(
        "args", f"{cls.__name__} must be an attrs class, a dataclass or a mapping"
    )


# Per args type: deciding the kind of class takes longer than converting a small one.
_converters: dict[type[Any], _Converter] = {}


def _args_object(args: object) -> tuple[dict[str, Any], bool]:
    cls = type(args)
    convert = _converters.get(cls)
    if convert is None:
        convert = _converters[cls] = _converter(cls)
    return convert(args)


def args_to_dict(args: object) -> dict[str, Any]:
    """The JSON object for an args value: attrs and dataclass instances, or a mapping.

    Raises ValidationError when the args are none of these.
    """
    return _args_object(args)[0]


def _encode(field: str, data: Any, flat: bool, text: str | None = None) -> str:
    """``data`` (a JSON object for args and metadata; any JSON value for a job's output)
    as JSON text that ``jsonb`` stores unchanged, else ValidationError naming ``field``,
    where in ``data`` and the rule (see ``_validate``).

    Cheap for the usual flat object (``flat``: the caller knows every key is a str and
    every value a scalar; or ``data`` is no container at all): the encoder refuses NaN,
    ±Infinity, ints too long for text and non-JSON types, and its text shows the rest:
    NUL as an escape, a lone surrogate as text with no UTF-8 encoding. Only then is
    ``data`` walked, to name the place and the rule. Anything nested first has its shape
    checked (str keys, depth, no cycles), which also bounds the encoder's recursion.
    ``text``: ``data`` already encoded."""
    if text is None:
        if not flat:
            check_shape(field, data)
        try:
            text = _dumps_strict(data)
        except (TypeError, ValueError) as exc:
            check_json(field, data)  # names the place and the rule
            raise ValidationError(field, f"must be JSON-serialisable: {exc}") from None
    if text.isascii():
        if "\\u0000" in text or len(text) > NUMERIC_MAX_DIGITS:
            check_json(field, data)  # a NUL; or a literal backslash-u0000, or a long text
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        check_json(field, data)  # names the place
        raise ValidationError(field, "text holds a lone surrogate") from None
    if "\\u0000" in text or len(text) > NUMERIC_MAX_DIGITS:
        check_json(field, data)
    return text


def encode_args(args: object) -> str:
    """The args object's JSON text; ValidationError (field ``args``) for args that are not
    an attrs class, a dataclass or a mapping, or hold anything jsonb cannot store."""
    cls = type(args)
    convert = _converters.get(cls)
    try:
        if convert is None:
            convert = _converters[cls] = _converter(cls)
        data, flat = convert(args)
    except RecursionError:
        raise ValidationError(
            "args", f"nested more than {MAX_JSON_DEPTH} levels deep, or circular"
        ) from None
    except ValidationError:
        raise
    except (TypeError, ValueError) as exc:
        raise ValidationError("args", f"must be JSON-serialisable: {exc}") from None
    if not flat:
        return _encode("args", data, False)
    # The hot path, inlined: a flat object whose text is plainly fine.
    try:
        text = _dumps_strict(data)
    except (TypeError, ValueError):
        return _encode("args", data, True)  # fails again, and says why
    if text.isascii() and "\\u0000" not in text and len(text) <= NUMERIC_MAX_DIGITS:
        return text
    return _encode("args", data, True, text)


def encode_metadata(metadata: Mapping[str, Any]) -> str:
    """``InsertOpts.metadata`` as JSON text; ValidationError for a key trioqueue reserves
    or anything jsonb cannot store."""
    data = dict(metadata)
    for key, value in data.items():
        if type(key) is not str or not isinstance(value, _SCALARS) or key in RESERVED_METADATA_KEYS:
            check_metadata_keys("InsertOpts.metadata", data)
            return _encode("InsertOpts.metadata", data, False)
    return _encode("InsertOpts.metadata", data, True)


MAX_OUTPUT_BYTES: Final = 1_048_576
"""The most a job's recorded output may take: 1 MiB of UTF-8 JSON text, as `encode_output`
writes it (compact: no spaces between tokens, non-ASCII characters as themselves)."""


def _fields_of(value: Any) -> dict[str, Any] | None:
    """The fields of an attrs or dataclass instance as ``{name: value}`` (not converted
    further), a ``Mapping`` that is no dict as a dict, or None for anything else. Runs
    the value's own code (field getters, ``items()``): what that raises propagates."""
    cls = type(value)
    if attrs.has(cls):
        return _field_reader(cls)(value)
    if dataclasses.is_dataclass(cls):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(cls)}
    if isinstance(value, Mapping):
        if len(value) > MAX_OUTPUT_BYTES // 4:  # each entry takes at least 4 bytes
            raise _refused(f"a mapping of {len(value):,} entries: {_TOO_BIG}")
        return dict(value)
    return None


def _refused(rule: str) -> ValidationError:
    return ValidationError("output", rule)


_TOO_BIG = f"over the {MAX_OUTPUT_BYTES:,}-byte (1 MiB) cap on a job's output"


class _Plain:
    """Makes a return value plain JSON data (see `encode_output`): each attrs or dataclass
    instance, wherever it is, a dict of its fields; other mappings dicts; tuples lists.
    A container is copied only when something inside it changed, so plain data comes
    back as the very same object; keys, scalars and anything else are left as they are,
    for `_encode` to accept or refuse.

    Bounded whatever the value: a container nested past ``MAX_JSON_DEPTH`` levels, or
    met again inside itself, is left as it is (`_encode` then names the place and the
    rule); an instance to convert there is refused at once. And the walk counts the
    fewest bytes of JSON text each value it visits must take (every path through shared
    containers counts): past `MAX_OUTPUT_BYTES` the value is refused as too big, before
    anything is encoded, so a small object graph that shares containers level after
    level cannot make the walk (or the encoding) run for ever."""

    __slots__ = ("_left", "_open")

    def __init__(self) -> None:
        self._left = MAX_OUTPUT_BYTES
        """Bytes of the cap left: each value visited takes at least one (a str its
        length and two quotes), each list item one more (a comma or a bracket), each
        object entry its key's length plus four (quotes, colon, comma or brace)."""
        self._open: set[int] = set()
        """The containers and instances being walked (to find a value inside itself)."""

    def _take(self, size: int) -> None:
        self._left -= size
        if self._left < 0:
            raise _refused(f"the JSON text is {_TOO_BIG}")

    def value(self, value: Any, depth: int) -> Any:
        self._take(len(value) + 2 if type(value) is str else 1)
        if isinstance(value, _SCALARS):
            return value
        if isinstance(value, dict | list | tuple):
            if depth > MAX_JSON_DEPTH or id(value) in self._open:
                return value
            return self._container(value, depth)
        fields = _fields_of(value)
        if fields is None:
            return value
        if depth > MAX_JSON_DEPTH:
            raise _refused(f"nested more than {MAX_JSON_DEPTH} levels deep")
        if id(value) in self._open:
            raise _refused(
                f"the value is circular: a {type(value).__name__} instance contains itself"
            )
        self._open.add(id(value))
        plain = self._container(fields, depth)
        self._open.discard(id(value))
        return plain

    def _container(self, value: dict[Any, Any] | list[Any] | tuple[Any, ...], depth: int) -> Any:
        self._open.add(id(value))
        if isinstance(value, dict):
            changed = type(value) is not dict
            items = []
            for key, item in value.items():
                self._take(len(key) + 4 if type(key) is str else 1)
                plain = self.value(item, depth + 1)
                changed = changed or plain is not item
                items.append((key, plain))
            result: Any = dict(items) if changed else value
        else:
            changed = type(value) is not list
            converted = []
            for item in value:
                self._take(1)
                plain = self.value(item, depth + 1)
                changed = changed or plain is not item
                converted.append(plain)
            result = converted if changed else value
        self._open.discard(id(value))
        return result


_CONTAINERS = (dict, list, tuple)


def _flat(data: Any) -> bool:
    """Whether ``data`` is a scalar, or a dict with str keys or a list holding scalars
    only: plain data, with nothing to convert and no shape for `_encode` to check."""
    if isinstance(data, _SCALARS):
        return True
    if type(data) is dict:
        return all(type(k) is str and isinstance(v, _SCALARS) for k, v in data.items())
    if type(data) is list:
        return all(isinstance(v, _SCALARS) for v in data)
    return False


_SMALL_CONTAINER: Final = 1000


def _small(value: Any) -> bool:
    """Whether ``value`` is small enough to encode before its size is known: a larger
    one is walked first (`_Plain` counts its bytes and stops at the cap), so a huge
    return value is refused in about the time its first mebibyte takes, not encoded."""
    if type(value) is str:
        return len(value) <= MAX_OUTPUT_BYTES
    if type(value) in (list, dict):
        return len(value) <= _SMALL_CONTAINER
    return True


def encode_output(value: object) -> str | None:
    """A worker's return value as the JSON text recorded as the job's output; None for
    None (no output).

    attrs and dataclass instances become objects of their fields, wherever they are in
    ``value`` (nested in each other, or in dicts, lists and tuples); other mappings
    become objects, tuples lists. The result must be JSON that ``jsonb`` stores as it is
    (the rules of ``_validate``: no NaN or ±Infinity, no NUL or lone surrogate in text or
    keys, str keys only, at most ``MAX_JSON_DEPTH`` levels, nothing circular, nothing
    but dict, list, tuple, str, int, float, bool and None) and at most
    `MAX_OUTPUT_BYTES` of UTF-8. Otherwise raises ValidationError (field ``output``)
    naming the place in the value and the rule.

    The value's own code runs here (attrs and dataclass field getters, ``items()`` of
    mappings, ``__iter__`` of list and tuple subclasses): whatever it raises propagates
    as it is. Pure: nothing is written."""
    if value is None:
        return None
    try:
        if _small(value) and _flat(value):
            text = _encode("output", value, True)
        else:
            data = _Plain().value(value, 1)
            text = _encode("output", data, not isinstance(data, _CONTAINERS) or _flat(data))
    except RecursionError:  # only a value's own code can recurse this far
        raise _refused(f"nested more than {MAX_JSON_DEPTH} levels deep, or circular") from None
    size = len(text) if text.isascii() else len(text.encode())
    if size > MAX_OUTPUT_BYTES:
        raise _refused(f"the JSON text is {size:,} bytes of UTF-8: {_TOO_BIG}")
    return text


def decode_args(args_type: type[Any] | None, data: Any) -> Any:
    """Build the args value from its JSON object; the raw object when the type is unknown
    or does not accept it (so a stored job can always be read)."""
    if args_type is None or not isinstance(data, dict):
        return data
    from_json = getattr(args_type, "from_json", None)
    if from_json is not None:
        return from_json(data)
    return args_type(**data)


_BIT_ORDER = (
    JobState.SCHEDULED,
    JobState.RUNNING,
    JobState.RETRYABLE,
    JobState.PENDING,
    JobState.DISCARDED,
    JobState.COMPLETED,
    JobState.CANCELLED,
    JobState.AVAILABLE,
)


def unique_states_bits(states: frozenset[JobState]) -> str:
    """The bit(8) string for a set of states; ``available`` is the rightmost bit."""
    return "".join("1" if s in states else "0" for s in _BIT_ORDER)


def unique_key(
    kind: str, args_json_sorted: str | None, opts: InsertOpts, unique: UniqueOpts, now: datetime
) -> bytes:
    """sha256 over the parts of the job that ``unique`` names."""
    parts = [f"kind={kind}"]
    if unique.by_args:
        parts.append(f"args={args_json_sorted}")
    if unique.by_period is not None:
        at = opts.scheduled_at or now
        ts = at.timestamp()
        start = ts - (ts % unique.by_period)
        try:
            period = datetime.fromtimestamp(start, UTC).isoformat()
        except (OverflowError, OSError, ValueError):
            # A period starting before year 1 (a long by_period, an early time): no
            # datetime names it, its number of seconds does.
            period = repr(start)
        parts.append(f"period={period}")
    if unique.by_queue:
        parts.append(f"queue={opts.queue}")
    return hashlib.sha256("&".join(parts).encode()).digest()


def sorted_args_json(args: object) -> str:
    return _dumps_sorted(args_to_dict(args))


def with_args(job: Job[Any], args: Any) -> Job[Any]:
    """``job`` with other args (the hot path's cheaper ``attrs.evolve``)."""
    return Job(
        job.id,
        job.kind,
        args,
        job.queue,
        job.state,
        job.priority,
        job.attempt,
        job.max_attempts,
        job.attempted_at,
        job.attempted_by,
        job.created_at,
        job.finalized_at,
        job.scheduled_at,
        job.errors,
        job.metadata,
        job.tags,
    )


def _parse_ts(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


_UNKNOWN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
"""The ``at`` of a stored error entry whose time cannot be read."""


def _error(entry: Any) -> AttemptError:
    """One stored error entry. A row written by hand may hold anything here: what cannot
    be read as an entry is shown as its text, so that the job can still be read (and
    run) and nothing is hidden."""
    if not isinstance(entry, dict):
        return AttemptError(_UNKNOWN_TIME, 0, dumps(entry), "")
    try:
        at = _parse_ts(entry.get("at"))
    except (TypeError, ValueError):
        at = _UNKNOWN_TIME
    attempt = entry.get("attempt", 0)
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        attempt = 0
    return AttemptError(at, attempt, str(entry.get("error", "")), str(entry.get("trace", "")))


def _errors(raw: Any) -> list[AttemptError]:
    if not isinstance(raw, list):
        return [] if not raw else [_error(raw)]
    return [_error(e) for e in raw]


def _metadata(raw: Any) -> dict[str, Any]:
    """Stored metadata as a dict; a value that is not an object (written by hand) is kept
    under one key that says so, rather than failing the read or vanishing."""
    if isinstance(raw, dict):
        return dict(raw)
    return {} if raw is None else {"(stored metadata is not an object)": raw}


_STATES = {state.value: state for state in JobState}


def row_to_job(row: JobRow, args_type: type[Any] | None) -> Job[Any]:
    """A Job from a driver's row. Args that the type does not accept stay the decoded
    JSON object, so a stored job can always be read."""
    args = row.args
    if args_type is not None:
        try:
            args = decode_args(args_type, args)
        except Exception:
            args = row.args
    return row_to_job_with_args(row, args)


def row_to_job_with_args(row: JobRow, args: Any) -> Job[Any]:
    """A Job from a row, with ``args`` in place of the stored args (an insert's own).

    The row is unpacked into its field names in one step: reading sixteen fields by
    attribute (or index) costs a NamedTuple about three times what unpacking does, and
    every fetched job passes through here."""
    (
        job_id,
        kind,
        _stored_args,
        queue,
        state,
        priority,
        attempt,
        max_attempts,
        attempted_at,
        attempted_by,
        created_at,
        finalized_at,
        scheduled_at,
        errors,
        metadata,
        tags,
        output,
        workflow_id,
        workflow_task,
        workflow_deps,
    ) = row
    return Job(
        job_id,
        kind,
        args,
        queue,
        _STATES[state],
        priority,
        attempt,
        max_attempts,
        attempted_at,
        list(attempted_by or ()),
        created_at,
        finalized_at,
        scheduled_at,
        _errors(errors) if errors else [],
        _metadata(metadata),
        list(tags or ()),
        output,
        workflow_id,
        workflow_task,
        tuple(workflow_deps or ()),
    )
