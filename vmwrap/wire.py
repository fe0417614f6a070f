"""The accepted request on its way from submit time to the node, spelled once.

A submit-time check (Slurm's job_submit.lua, Grid Engine's JSV) accepts a job's VM request and
leaves it where the scheduler carries it to the root prolog, the gap planner and the prestager:

- Slurm: the job's comment, `vmwrap:image=NAME,memory=MIB,cpus=N,lost=restart|fail` (empty values
  mean "not given"), followed by ` | ` and the user's own comment if there was one. The Lua filter
  formats it with `lua_format()`, rendered into job_submit.lua from here.
- Grid Engine: the job context item `vmwrap_image=NAME` (`qsub -ac`), and `vmwrap_memory=MIB` when
  the script gives --memory (the planner cannot read the script; the prolog checks it against the
  script); the rest stays in the script's #VMWRAP lines, which root reads from the spooled script.

Versioned (issue 24): FORMAT is what this vmwrap writes and the newest it reads. Format 1 carries no
version (what every vmwrap so far writes, so nodes not yet upgraded read it during a rolling
upgrade); a later format starts the comment with `vmwrap:v=N,` (Grid Engine: the context item
`vmwrap_format=N`). A request of a newer format than this vmwrap's is refused naming both: the job
fails with that reason (WireError, a user error), the node stays up.

Users write comments and contexts too (`scontrol update comment=`, `qalter -ac`): `decode` trusts
nothing, bounds every number before int() sees it, and names what is wrong (WireError).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .directives import IMAGE_NAME, MAX_CPUS, MAX_MEMORY_MIB, POLICIES, check_image_name
from .errors import UserError

PREFIX = "vmwrap:"
USER_SEPARATOR = " | "  # the user's own comment follows the request
FIELDS = ("image", "memory", "cpus", "lost")
CONTEXT_IMAGE = "vmwrap_image"  # Grid Engine's job context key
CONTEXT_MEMORY = "vmwrap_memory"  # Grid Engine: the script's --memory in MiB, for the gap planner
CONTEXT_FORMAT = "vmwrap_format"  # Grid Engine: the request's format when it is not 1
FORMAT = 1
VERSION_FIELD = "v"


class WireError(UserError):
    """A comment or context that claims to carry a VM request but is not one vmwrap wrote."""


@dataclass(frozen=True)
class Accepted:
    """A request the submit-time check accepted; None means 'not given' (image or site defaults apply)."""

    image: str
    memory_mib: int | None = None
    cpus: int | None = None
    on_lost_checkpoint: str | None = None


def _clip(s: str, n: int = 40) -> str:
    return repr(s[:n]) + (f"... ({len(s)} characters)" if len(s) > n else "")


def _number(name: str, value: str, top: int) -> int | None:
    if value == "":
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= len(str(top))):
        raise WireError(f"{name}={_clip(value)} is not a whole number from 1 to {top}")
    n = int(value)
    if not 1 <= n <= top:
        raise WireError(f"{name}={_clip(value)} is not a whole number from 1 to {top}")
    return n


def _image(value: str) -> str:
    if not IMAGE_NAME.fullmatch(value):
        raise WireError(f"image={_clip(value)} is not an image name")
    return value


def _policy(value: str) -> str | None:
    if value not in ("",) + POLICIES:
        raise WireError(f"lost={_clip(value)} is not {' or '.join(POLICIES)}")
    return value or None


def encode(a: Accepted) -> str:
    """The comment text for `a` (what job_submit.lua writes); WireError for anything decode would refuse."""
    try:
        _image(a.image if isinstance(a.image, str) else repr(a.image))
        for name, v, top in (("memory", a.memory_mib, MAX_MEMORY_MIB), ("cpus", a.cpus, MAX_CPUS)):
            if v is not None and (type(v) is not int or not 1 <= v <= top):
                raise WireError(f"{name}={v!r} is not a whole number from 1 to {top}")
        _policy(a.on_lost_checkpoint or "")
    except WireError as e:
        raise WireError(f"cannot carry {a!r} as a VM request: {e}") from None
    return f"{PREFIX}image={a.image},memory={a.memory_mib or ''},cpus={a.cpus or ''},lost={a.on_lost_checkpoint or ''}"


def decode(comment: str | None) -> Accepted | None:
    """The request in a job's comment; None for a comment that is not one (a plain job).

    A comment that starts with PREFIX but is not what job_submit.lua writes raises WireError: the job
    was meant to run in a VM (or someone forged a request) and must not run bare, nor on a guess."""
    comment = comment or ""
    if not comment.startswith(PREFIX):
        return None
    try:
        return _fields(_versioned(comment[len(PREFIX):].partition(USER_SEPARATOR)[0]))
    except FormatError:
        raise
    except WireError as e:
        raise WireError(f"the job's comment starts with {PREFIX!r} but is not a VM request vmwrap wrote "
                        f"({e}): {_clip(comment, 80)}") from None


class FormatError(WireError):
    """A request written by a newer vmwrap's submit-time check than this node's."""


def _too_new(fmt: int, where: str) -> FormatError:
    from . import __version__

    return FormatError(f"the job's VM request ({where}) has format {fmt}, written by a newer vmwrap's submit "
                       f"filter; this node's vmwrap {__version__} reads formats up to {FORMAT}: "
                       "upgrade vmwrap on this node")


def format_of(value: str, where: str) -> int:
    """The format number a carried request names (text from the job: bounded before int()); FormatError,
    naming both formats, when it is newer than this vmwrap's."""
    fmt = _number(VERSION_FIELD, value, 999)
    if fmt is None:
        raise WireError(f"{where} gives no format")
    if fmt > FORMAT:
        raise _too_new(fmt, where)
    return fmt


def _versioned(body: str) -> str:
    """`body` without its `v=N,` field (format 1 has none); FormatError for a format newer than FORMAT."""
    key, eq, rest = body.partition("=")
    if key != VERSION_FIELD or not eq:
        return body
    value, _, fields = rest.partition(",")
    format_of(value, "the job's comment")
    return fields


def _fields(body: str) -> Accepted:
    items = body.split(",", len(FIELDS))
    if len(items) != len(FIELDS):
        raise WireError(f"{len(items)} comma-separated fields where {len(FIELDS)} belong ({', '.join(FIELDS)})")
    values = {}
    for want, item in zip(FIELDS, items):
        key, eq, value = item.partition("=")
        if key != want or not eq:
            raise WireError(f"{_clip(item)} where {want}=... belongs")
        values[key] = value
    return Accepted(image=_image(values["image"]), memory_mib=_number("memory", values["memory"], MAX_MEMORY_MIB),
                    cpus=_number("cpus", values["cpus"], MAX_CPUS), on_lost_checkpoint=_policy(values["lost"]))


def lua_format() -> str:
    """`encode` as a Lua format string; job_submit.lua passes the values in FIELDS order ("" for none)."""
    return PREFIX + ",".join(f"{f}=%s" for f in FIELDS)


def encode_context(image: str, memory_mib: int | None = None) -> str:
    """The job context items that carry the image and the requested memory (Grid Engine `-ac`)."""
    mem = "" if memory_mib is None else f",{CONTEXT_MEMORY}={_number(CONTEXT_MEMORY, str(memory_mib), MAX_MEMORY_MIB)}"
    return f"{CONTEXT_IMAGE}={check_image_name(image)}{mem}"


def decode_context_memory(items: Iterable[str]) -> int | None:
    """The requested memory (MiB) from job context items; None when none gives it. Users can change
    it (`qalter -ac`): a value that is not a bounded whole number, or two different ones, raise WireError."""
    values = {v.strip() for k, _, v in (kv.partition("=") for kv in items) if k.strip() == CONTEXT_MEMORY}
    if len(values) > 1:
        raise WireError(f"the job's context gives more than one {CONTEXT_MEMORY}: "
                        + ", ".join(_clip(v) for v in sorted(values)[:3]))
    return _number(CONTEXT_MEMORY, values.pop(), MAX_MEMORY_MIB) if values else None


def decode_context(items: Iterable[str]) -> str | None:
    """The image from job context items 'key=value'; None when none names it. `qalter -ac` can change
    the context after the JSV checked it: a value that is not an image name, or two different ones,
    raise UserError."""
    names, formats = set(), set()
    for kv in items:
        k, _, v = kv.partition("=")
        if k.strip() == CONTEXT_IMAGE:
            names.add(v.strip())
        elif k.strip() == CONTEXT_FORMAT:
            formats.add(v.strip())
    for f in formats:
        fmt = _number(CONTEXT_FORMAT, f, 999)
        if fmt is not None and fmt > FORMAT:
            raise _too_new(fmt, f"the job's context {CONTEXT_FORMAT}={fmt}")
    if len(names) > 1:
        raise WireError(f"the job's context names more than one {CONTEXT_IMAGE}: "
                        + ", ".join(repr(n[:64]) for n in sorted(names)[:3]))
    return check_image_name(names.pop()) if names else None
