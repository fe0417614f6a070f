"""`#VMWRAP` directives: read only from the script's leading comment block, as sbatch reads `#SBATCH`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

PREFIX = "#VMWRAP"
IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SIZE = re.compile(r"^(\d+)([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_UNIT_MIB = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
MAX_CPUS = 4096
MAX_MEMORY_MIB = 64 * 1024 * 1024  # 64 TiB: anything above is a typo, not a request
# The least memory a guest boots in reliably, refused at submit below it. Measured with the Debian
# guest kernel and the busybox appliance: 72M and 80M panic ("System is deadlocked on memory"), 64M
# hangs in boot, 96M boots with 7 MB free; 128M ran every job of the saturated-host tests.
MIN_MEMORY_MIB = 128
POLICIES = ("restart", "fail")     # --on-lost-checkpoint
_DURATION = re.compile(r"^(\d{1,7})([smh]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600}
MAX_DURATION_S = 366 * 24 * 3600   # a year: anything above is a typo


@dataclass
class Request:
    """What a job asked for; None means 'not given' (catalog or site defaults apply)."""

    image: str | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    on_lost_checkpoint: str | None = None
    checkpoint_every_s: int | None = None


def check_image_name(name: str) -> str:
    if not IMAGE_NAME.fullmatch(name):
        shown = repr(name) if len(name) <= 80 else f"{name[:60]!r}... ({len(name)} characters)"
        raise UserError(
            f"invalid image name {shown}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no paths, quotes, spaces or markup)"
        )
    return name


def parse_memory(value: str) -> int:
    """Memory in MiB from '512', '512M', '2G', '2GiB' (bare numbers are MiB, like sbatch --mem)."""
    v = value.strip()
    if v.startswith("-"):
        raise UserError(f"--memory={value}: memory must be positive")
    m = _SIZE.match(v)
    if m and len(m.group(1)) > 15:
        raise UserError(f"--memory={v[:12]}...: absurdly large (limit {MAX_MEMORY_MIB // (1024 * 1024)} TiB)")
    if not m:
        raise UserError(f"--memory={value}: not a size; use e.g. 512M or 2G")
    mib = int(m.group(1)) * _UNIT_MIB[m.group(2).upper()]
    if mib < 1:
        raise UserError(f"--memory={value}: memory must be at least 1M")
    if mib < MIN_MEMORY_MIB:
        raise UserError(f"--memory={value}: a VM needs at least {MIN_MEMORY_MIB}M to boot its kernel reliably")
    if mib > MAX_MEMORY_MIB:
        raise UserError(f"--memory={value}: absurdly large (limit {MAX_MEMORY_MIB // (1024 * 1024)} TiB)")
    return int(mib)


def parse_cpus(value: str) -> int:
    v = value.strip()
    if not re.fullmatch(r"-?\d+", v):
        raise UserError(f"--cpus={value}: not a whole number")
    if len(v.lstrip("-")) > 9:  # int() refuses > 4300 digits with ValueError: a user's text never crashes a hook
        raise UserError(f"--cpus={v[:12]}...: absurdly large (limit {MAX_CPUS})")
    n = int(v)
    if n <= 0:
        raise UserError(f"--cpus={value}: must be at least 1")
    if n > MAX_CPUS:
        raise UserError(f"--cpus={value}: absurdly large (limit {MAX_CPUS})")
    return n


def _parse_policy(value: str) -> str:
    if value not in POLICIES:
        raise UserError(f"--on-lost-checkpoint={value}: use 'restart' or 'fail'")
    return value


def parse_duration(value: str, option: str = "--checkpoint-every") -> int:
    """Seconds from '90', '90s', '15m', '2h' (bare numbers are seconds)."""
    m = _DURATION.match(value.strip())
    if not m:
        raise UserError(f"{option}={value}: not a duration; use e.g. 90s, 15m or 2h")
    n = int(m.group(1)) * _UNIT_S[m.group(2)]
    if n < 1:
        raise UserError(f"{option}={value}: must be at least 1s")
    if n > MAX_DURATION_S:
        raise UserError(f"{option}={value}: absurdly long (limit {MAX_DURATION_S // 86400} days)")
    return n


_OPTIONS = {
    "image": ("image", check_image_name),
    "memory": ("memory_mib", parse_memory),
    "cpus": ("cpus", parse_cpus),
    "on-lost-checkpoint": ("on_lost_checkpoint", _parse_policy),
    "checkpoint-every": ("checkpoint_every_s", parse_duration),
}


def parse(script: str) -> Request:
    """Parse the directives of a job script; raise UserError naming the line on any mistake."""
    req = Request()
    seen: set[str] = set()
    for lineno, line in leading_comment_block(script):
        if not (line.startswith(PREFIX) and (len(line) == len(PREFIX) or line[len(PREFIX)].isspace())):
            continue
        tokens = line[len(PREFIX):].split()
        if not tokens:
            raise UserError(f"line {lineno}: empty {PREFIX} directive")
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if not tok.startswith("--"):
                raise UserError(f"line {lineno}: unexpected {tok!r}; directives look like --image=NAME")
            name, eq, value = tok[2:].partition("=")
            if name not in _OPTIONS:
                known = ", ".join("--" + k for k in _OPTIONS)
                raise UserError(f"line {lineno}: unknown directive --{name} (known: {known})")
            if not eq:
                if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                    raise UserError(f"line {lineno}: --{name} needs a value")
                i += 1
                value = tokens[i]
            if name in seen:
                raise UserError(f"line {lineno}: duplicate directive --{name}")
            if value == "":
                raise UserError(f"line {lineno}: --{name} needs a value")
            seen.add(name)
            attr, conv = _OPTIONS[name]
            try:
                setattr(req, attr, conv(value))
            except UserError as e:
                raise UserError(f"line {lineno}: {e}") from None
            i += 1
    return req


def leading_comment_block(script: str):
    """Yield (lineno, line) for the comment/blank lines before the first command."""
    for lineno, raw in enumerate(script.splitlines(), start=1):
        line = raw.strip()
        if lineno == 1 and line.startswith("#!"):
            continue
        if line == "" or line.startswith("#"):
            yield lineno, line
            continue
        return
