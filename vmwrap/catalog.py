"""The site's image catalog (TOML): which appliances exist, where their bytes come from, who may use them."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import tomllib
from dataclasses import dataclass, field

from .directives import check_image_name, parse_cpus, parse_memory
from .errors import NodeError, UserError

_SHA = re.compile(r"^[0-9a-f]{64}$")
BOOT_METHODS = ("kernel",)  # 'disk' (firmware boots the disk) is planned; see docs/design.md
# The image's network, chosen by the site in its catalog (docs/catalog.md): "none", no network device at
# all; "nat", QEMU's user-mode NAT out of the node as the job's own user (vmwrap/domain.py), no port in.
NETWORKS = ("none", "nat")
KEYS = {"boot", "kernel", "initrd", "disk", "cmdline", "memory", "cpus", "max_memory", "max_cpus", "network",
        "checkpoint", "users", "groups", "description", "origin", "env"}


@dataclass(frozen=True)
class Artifact:
    """One file of an appliance: identified by content, fetched from source."""

    source: str
    sha256: str
    size: int
    format: str = "raw"


@dataclass
class Image:
    name: str
    boot: str
    kernel: Artifact
    initrd: Artifact
    disk: Artifact | None = None
    cmdline: str = ""
    memory_mib: int | None = None
    cpus: int | None = None
    users: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    description: str = ""
    # Where the image came from (e.g. "oci sha256:...", "disk debian 12", "appliance busybox"): provenance.
    origin: str = ""
    # Default environment of the job inside this image (an OCI image's Env); the job's own variables win,
    # except PATH, which is the image's when set (the host's PATH means nothing inside another root).
    env: dict[str, str] = field(default_factory=dict)
    # Site policy: the most memory/CPUs a job's VM of this image may have (None: no limit of the
    # image's own), its network (NETWORKS), and whether its VMs may be saved at all.
    max_memory_mib: int | None = None
    max_cpus: int | None = None
    network: str = "none"
    checkpoint: bool = True

    def check_size(self, memory_mib: int | None, cpus: int | None) -> None:
        """UserError when a requested size exceeds this image's max_memory/max_cpus: the one check the
        submit filters and the node's request resolution share."""
        if memory_mib is not None and self.max_memory_mib and memory_mib > self.max_memory_mib:
            raise UserError(f"--memory={memory_mib}M is more than image {self.name} allows "
                            f"(max_memory = {self.max_memory_mib}M)")
        if cpus is not None and self.max_cpus and cpus > self.max_cpus:
            raise UserError(f"--cpus={cpus} is more than image {self.name} allows (max_cpus = {self.max_cpus})")

    @property
    def digest(self) -> str:
        """One content digest for the whole image (kernel, initrd, disk): what accounting records."""
        import hashlib
        h = hashlib.sha256()
        for key, a in sorted(self.artifacts().items()):
            h.update(f"{key}={a.sha256}\n".encode())
        return "sha256:" + h.hexdigest()

    def artifacts(self) -> dict[str, Artifact]:
        out = {"kernel": self.kernel, "initrd": self.initrd}
        if self.disk:
            out["disk"] = self.disk
        return out

    @property
    def restricted(self) -> bool:
        """Only the listed users/groups may run it: none of its files (kernel, initrd, disk) may be
        readable by anyone else on a node (Cache.grant)."""
        return bool(self.users or self.groups) and "*" not in self.users

    def allows(self, user: str, gid: int | None = None) -> bool:
        """Open to all when neither users nor groups is set; '*' in users also means everyone."""
        if not self.users and not self.groups:
            return True
        if "*" in self.users or user in self.users:
            return True
        if not self.groups:
            return False
        mine: set[str] = set()
        try:
            pw = pwd.getpwnam(user)
            gids = os.getgrouplist(user, pw.pw_gid if gid is None else gid)
            for g in gids:
                try:
                    mine.add(grp.getgrgid(g).gr_name)
                except KeyError:
                    pass
        except KeyError:
            return False
        return bool(mine & set(self.groups))


class Catalog:
    def __init__(self, images: dict[str, Image], path: str = "<memory>"):
        self.images = images
        self.path = path

    @classmethod
    def load(cls, path: str) -> "Catalog":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise NodeError(f"image catalog {path} does not exist (vmwrap image build or image add)") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise NodeError(f"image catalog {path} is unreadable: {e}") from None
        images = {}
        for name, entry in (data.get("images") or {}).items():
            images[name] = _image(path, name, entry)
        return cls(images, path)

    def offered(self) -> list[str]:
        """The image names any user may be told about: a restricted image's name is for its users only."""
        return sorted(n for n, img in self.images.items() if not img.restricted)

    def resolve(self, name: str, user: str, gid: int | None = None, *, memory_mib: int | None = None,
                cpus: int | None = None) -> Image:
        """The image `user` may run, sized within its policy (the requested memory/CPUs, if known)."""
        check_image_name(name)
        img = self.images.get(name)
        if img is None:
            known = ", ".join(self.offered()) or "none"
            raise UserError(f"unknown image {name!r} (this site offers: {known})")
        if not img.allows(user, gid):
            raise UserError(f"user {user!r} may not use image {name!r} (ask your admin to be added)")
        img.check_size(memory_mib, cpus)
        return img


def _artifact(path: str, name: str, key: str, entry: dict) -> Artifact:
    where = f"{path}: images.{name}.{key}"
    if not isinstance(entry, dict):
        raise NodeError(f"{where} must be a table with source, sha256, size")
    try:
        a = Artifact(str(entry["source"]), str(entry["sha256"]).lower(), int(entry["size"]), str(entry.get("format", "raw")))
    except KeyError as e:
        raise NodeError(f"{where} lacks {e.args[0]}") from None
    if not _SHA.match(a.sha256):
        raise NodeError(f"{where}.sha256 is not 64 hex digits")
    if a.size <= 0:
        raise NodeError(f"{where}.size must be positive")
    if a.format not in ("raw", "qcow2"):
        raise NodeError(f"{where}.format must be raw or qcow2")
    return a


def _image(path: str, name: str, e: dict) -> Image:
    try:
        check_image_name(name)
    except UserError as err:
        raise NodeError(f"{path}: {err}") from None
    boot = e.get("boot", "kernel")
    if boot not in BOOT_METHODS:
        raise NodeError(f"{path}: images.{name}.boot={boot!r} is not supported (supported: {', '.join(BOOT_METHODS)})")
    for k in ("kernel", "initrd"):
        if k not in e:
            raise NodeError(f"{path}: images.{name} needs a [{k}] table for boot='kernel'")
    unknown = sorted(set(e) - KEYS)
    if unknown:
        raise NodeError(f"{path}: images.{name}.{unknown[0]} is not a catalog key (known: {', '.join(sorted(KEYS))})")
    sizes = {}
    for key in ("memory", "cpus", "max_memory", "max_cpus"):
        if key in e:
            try:
                sizes[key] = (parse_memory if "memory" in key else parse_cpus)(str(e[key]))
            except UserError as err:
                raise NodeError(f"{path}: images.{name}.{key}: {str(err).partition(': ')[2] or err}") from None
    mem, cpus = sizes.get("memory"), sizes.get("cpus")
    max_mem, max_cpus = sizes.get("max_memory"), sizes.get("max_cpus")
    if mem and max_mem and mem > max_mem:
        raise NodeError(f"{path}: images.{name}.memory = {mem}M is more than its max_memory = {max_mem}M")
    if cpus and max_cpus and cpus > max_cpus:
        raise NodeError(f"{path}: images.{name}.cpus = {cpus} is more than its max_cpus = {max_cpus}")
    network = e.get("network", "none")
    if network not in NETWORKS:
        raise NodeError(f"{path}: images.{name}.network = {str(network)[:40]!r} is not supported: it is one of "
                        + ", ".join(f'"{n}"' for n in NETWORKS))
    ckpt = e.get("checkpoint", True)
    if not isinstance(ckpt, bool):
        raise NodeError(f"{path}: images.{name}.checkpoint must be true or false")
    for key in ("users", "groups"):
        if not isinstance(e.get(key, []), list):
            raise NodeError(f"{path}: images.{name}.{key} must be a list of names")
    return Image(
        name=name,
        boot=boot,
        kernel=_artifact(path, name, "kernel", e["kernel"]),
        initrd=_artifact(path, name, "initrd", e["initrd"]),
        disk=_artifact(path, name, "disk", e["disk"]) if "disk" in e else None,
        cmdline=str(e.get("cmdline", "")),
        memory_mib=mem,
        cpus=cpus,
        users=[str(u) for u in e.get("users", [])],
        groups=[str(g) for g in e.get("groups", [])],
        description=str(e.get("description", "")),
        origin=str(e.get("origin", "")),
        env=_env(path, name, e.get("env", {})),
        max_memory_mib=max_mem,
        max_cpus=max_cpus,
        network=network,
        checkpoint=ckpt,
    )


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env(path: str, name: str, env: object) -> dict[str, str]:
    if not isinstance(env, dict):
        raise NodeError(f"{path}: images.{name}.env must be a table of NAME = \"value\"")
    out = {}
    for k, v in env.items():
        if not _ENV_NAME.match(k) or not isinstance(v, str) or "\0" in v:
            raise NodeError(f"{path}: images.{name}.env.{k} must be a valid variable name with a string value")
        out[k] = v
    return out


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings


def render_entry(img: Image) -> str:
    """TOML text for one image, used by `vmwrap image build` to register what it built."""
    lines = [f"[images.{img.name}]", f"boot = {_toml_str(img.boot)}"]
    if img.description:
        lines.append(f"description = {_toml_str(img.description)}")
    if img.origin:
        lines.append(f"origin = {_toml_str(img.origin)}")
    if img.memory_mib:
        lines.append(f'memory = "{img.memory_mib}M"')
    if img.cpus:
        lines.append(f"cpus = {img.cpus}")
    if img.max_memory_mib:
        lines.append(f'max_memory = "{img.max_memory_mib}M"')
    if img.max_cpus:
        lines.append(f"max_cpus = {img.max_cpus}")
    if img.network != "none":
        lines.append(f"network = {_toml_str(img.network)}")
    if not img.checkpoint:
        lines.append("checkpoint = false")
    if img.cmdline:
        lines.append(f"cmdline = {_toml_str(img.cmdline)}")
    lines.append("users = [" + ", ".join(_toml_str(u) for u in img.users) + "]")
    lines.append("groups = [" + ", ".join(_toml_str(g) for g in img.groups) + "]")
    if img.env:
        lines.append("env = { " + ", ".join(f"{k} = {_toml_str(v)}" for k, v in img.env.items()) + " }")
    for key, a in img.artifacts().items():
        lines.append(
            f"{key} = {{ source = {_toml_str(a.source)}, sha256 = \"{a.sha256}\", size = {a.size}, format = \"{a.format}\" }}"
        )
    return "\n".join(lines) + "\n"


def register(path: str, img: Image) -> None:
    """Add or replace one image's entry in the catalog file, atomically. The entry is checked as a load
    would check it first: an invalid one (e.g. memory above max_memory) never reaches the file, where it
    would make the whole catalog unreadable."""
    entry = render_entry(img)
    _image(path, img.name, tomllib.loads(entry)["images"][img.name])
    kept = _without(path, img.name)
    _write(path, (kept + "\n\n" if kept else "") + entry)


def unregister(path: str, name: str) -> None:
    _write(path, _without(path, name) + "\n")


def _without(path: str, name: str) -> str:
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    blocks = re.split(r"(?m)^(?=\[images\.)", text)
    return "".join(b for b in blocks if not b.startswith(f"[images.{name}]")).rstrip("\n")


def _write(path: str, new: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)
