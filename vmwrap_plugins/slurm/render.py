"""`vmwrap config render slurm`: the slurm.conf lines and a job_submit.lua with the catalog compiled in."""

from __future__ import annotations

import grp
import math
import pwd
import shlex
from pathlib import Path

import jinja2

from vmwrap import directives, wire
from vmwrap.catalog import Catalog
from vmwrap.config import Settings
from vmwrap.resources import HOOKS, TEMPLATES

from .hooks import MARKER


def lua_literal(v) -> str:
    """A Lua literal for None or a string; every byte outside printable ASCII is escaped."""
    if v is None:
        return "nil"
    out = []
    for b in str(v).encode():
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def vmwrap_command(vmwrap: str, config: str | None) -> str:
    cmd = [vmwrap] + (["--config", config] if config else [])
    return " ".join(shlex.quote(c) for c in cmd)


def render_lua(catalog: Catalog, vmwrap: str = "/usr/local/bin/vmwrap", config: str | None = None,
               default_image: str | None = None, active_file: str = "/etc/slurm/vmwrap-active.lua",
               min_checkpoint_every_s: float | None = None) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=False,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["lua"] = lua_literal
    wanted = sorted({g for img in catalog.images.values() for g in img.groups})
    groups = []
    for name in wanted:
        try:
            g = grp.getgrnam(name)
        except KeyError:
            continue
        members = set(g.gr_mem) | {p.pw_name for p in pwd.getpwall() if p.pw_gid == g.gr_gid}
        groups.append({"name": name, "gid": g.gr_gid, "members": sorted(members)})
    return env.get_template("slurm/job_submit.lua.j2").render(
        images=sorted(catalog.images.values(), key=lambda i: i.name), groups=groups,
        offer=", ".join(catalog.offered()) or "none",
        vmwrap_cmd=vmwrap_command(vmwrap, config), default_image=default_image, active_file=active_file,
        marker=MARKER, max_cpus=directives.MAX_CPUS, max_memory_mib=directives.MAX_MEMORY_MIB, min_memory_mib=directives.MIN_MEMORY_MIB,
        max_duration_s=directives.MAX_DURATION_S,
        min_checkpoint_every_s=math.ceil(Settings.checkpoint_min_every_s if min_checkpoint_every_s is None
                                         else min_checkpoint_every_s),
        request_prefix=wire.PREFIX, request_format=wire.lua_format(), request_fields=", ".join(wire.FIELDS),
        user_separator=wire.USER_SEPARATOR)


DEFAULT_PROLOG_TIMEOUT_S = 300  # rendered when the site config names no prolog timeout


def prolog_timeout_lines(prolog_timeout_s: float) -> list[str]:
    """Slurm's PrologEpilogTimeout as the site config's `prolog_timeout_s`: vmwrap's prolog stops its
    own work before that limit only if it knows it, so the two must agree. With none set (0) the
    default is rendered, with a line asking the admin to tell vmwrap."""
    if prolog_timeout_s > 0:
        return [f"PrologEpilogTimeout={math.ceil(prolog_timeout_s)}"]
    return [f"# Set prolog_timeout_s = {DEFAULT_PROLOG_TIMEOUT_S} in vmwrap's config too, so that its prolog "
            "stops before Slurm kills it.",
            f"PrologEpilogTimeout={DEFAULT_PROLOG_TIMEOUT_S}"]


def slurm_conf_lines(vmwrap_hooks: Path = HOOKS, prolog_timeout_s: float = 0.0,
                     vmwrap_cmd: str = "/usr/local/bin/vmwrap") -> str:
    """slurm.conf's lines for vmwrap; `prolog_timeout_s` is the site config's (0: none set); `vmwrap_cmd`
    runs salloc's interactive step (the job's user)."""
    return "\n".join([
        "# vmwrap: per-job VMs (rendered by `vmwrap config render slurm`)",
        "JobSubmitPlugins=lua",
        f"Prolog={vmwrap_hooks / 'slurm-prolog'}",
        f"Epilog={vmwrap_hooks / 'slurm-epilog'}",
        "# Alloc: the prolog boots the VM at allocation, overlapping Slurm's own job launch.",
        "PrologFlags=Alloc",
        *prolog_timeout_lines(prolog_timeout_s),
        "# Time for the launcher to shut the guest down gracefully on scancel/time limit.",
        "KillWait=30",
        "# Preemption that saves the VM (docs/checkpoint.md): requeue, not cancel; no GraceTime on",
        "# partitions with PreemptMode=REQUEUE; a requeued job may restart after cred_expire seconds.",
        "JobRequeue=1",
        "#PreemptType=preempt/partition_prio",
        "#PartitionName=... PreemptMode=REQUEUE GraceTime=0",
        "#AuthInfo=cred_expire=30",
        "# On the head node, as a loop or a timer: `vmwrap slurm gc` (checkpoints of jobs cancelled while saved).",
        "# Interactive jobs: `salloc --container=IMAGE` gives a shell in the job's VM (docs/interactive.md);",
        "# salloc without an image gets the user's shell on the node, as Slurm's default step.",
        "LaunchParameters=use_interactive_step",
        f'InteractiveStepOptions="--interactive --preserve-env --pty {vmwrap_cmd} slurm interactive"',
        "",
    ])


def render_config(settings: Settings, lua_out: str | None = None, vmwrap_path: str = "/usr/local/bin/vmwrap",
                  default_image: str | None = None, node_config: str | None = None,
                  hooks_dir: Path = HOOKS) -> str:
    """`vmwrap config render slurm`: write job_submit.lua (atomically), return slurm.conf's lines."""
    import os
    import sys

    from vmwrap.directives import check_image_name
    from vmwrap.errors import UserError

    cat = Catalog.load(settings.catalog)
    if default_image:
        check_image_name(default_image)
        if default_image not in cat.images:
            raise UserError(f"default image {default_image!r} is not in the catalog")
    if node_config and "'" in node_config:
        raise UserError("--node-config must not contain a single quote")
    if lua_out is None:
        conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
        lua_out = os.path.join(os.path.dirname(conf), "job_submit.lua")
    out_dir = os.path.dirname(os.path.abspath(lua_out))
    if not os.path.isdir(out_dir):
        raise UserError(f"cannot write the Lua filter to {lua_out}: directory {out_dir} does not exist")
    active = os.path.join(out_dir, "vmwrap-active.lua")
    lua = render_lua(cat, vmwrap_path, node_config, default_image, active_file=active,
                     min_checkpoint_every_s=settings.checkpoint_min_every_s)
    tmp = f"{lua_out}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(lua)
    os.chmod(tmp, 0o644)
    os.replace(tmp, lua_out)
    print(f"# job_submit.lua written to {lua_out} ({len(cat.images)} images)", file=sys.stderr)
    return slurm_conf_lines(hooks_dir, settings.prolog_timeout_s, vmwrap_command(vmwrap_path, node_config))
