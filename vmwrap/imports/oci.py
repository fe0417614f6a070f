"""OCI image layouts and docker/podman save archives as vmwrap images.

Accepted: an OCI image-layout directory (oci-layout, index.json, blobs/sha256/...) or a tar of one
(`podman save --format oci-archive`, and what docker 25+ saves), and the classic `docker save` /
`podman save` archive (manifest.json, config <hex>.json, layer tars). The linux/amd64 image is selected
from an index (nested indexes followed, attestations skipped). Every blob is checked against its
digest while it is read (layers in the classic format against the config's diff_ids): a damaged layer
is "layer sha256:... digest mismatch", and nothing is registered.

From the config, `Env` becomes the image's default environment (catalog `env`: the job's own variables
win, except PATH). `WorkingDir`, `User`, `Entrypoint` and `Cmd` are not applied: a vmwrap job always
runs its batch script as the submitting user in its own work dir, as it would without a VM.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..catalog import Image
from ..errors import ImageError
from .layers import DIR_FLAGS, Digested, Extractor, member_parts, open_tar, tar_errors
from .rootfs import Filled, open_regular, run_import

JSON_MAX = 4 << 20          # index, manifest, config
ARCHIVE_MEMBERS_MAX = 100_000
LINK_HOPS = 8
INDEX_DEPTH = 4
ENV_MAX = 1024              # entries
ENV_BYTES_MAX = 64 * 1024
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # as the catalog checks it
OCI_INDEX = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
OCI_MANIFEST = ("application/vnd.oci.image.manifest.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json")
LAYER_TYPES = tuple(f"{base}{suffix}" for base in ("application/vnd.oci.image.layer.v1.tar",
                                                   "application/vnd.oci.image.layer.nondistributable.v1.tar")
                    for suffix in ("", "+gzip", "+zstd")) + (
    "application/vnd.docker.image.rootfs.diff.tar", "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")


class _DirStore:
    """Files of an OCI layout directory, opened beneath it without following links, regular files only."""

    def __init__(self, path: Path):
        self.src = str(path)
        try:
            self.fd = os.open(path, DIR_FLAGS)
        except OSError as e:
            raise ImageError(f"{path}: cannot open the OCI layout directory: {e.strerror}") from None

    def close(self) -> None:
        os.close(self.fd)

    def exists(self, rel: str) -> bool:
        try:
            f, _ = self.open(rel)
        except ImageError:
            return False
        f.close()
        return True

    def open(self, rel: str) -> tuple[BinaryIO, int]:
        parts = member_parts(rel)
        fd = os.dup(self.fd)
        try:
            for comp in parts[:-1]:
                nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except OSError as e:
            raise ImageError(f"{self.src}: {rel}: {e.strerror}") from None
        finally:
            os.close(fd)
        st = os.fstat(ffd)
        if not stat.S_ISREG(st.st_mode):
            os.close(ffd)
            raise ImageError(f"{self.src}: {rel} is not a regular file")
        return os.fdopen(ffd, "rb"), st.st_size


class _TarStore:
    """Files of a save archive (tar, maybe gzip'd) by name; its links resolved inside it, bounded."""

    def __init__(self, path: Path):
        self.src = str(path)
        self.f = open_regular(path, "archive")
        try:
            self.tf = open_tar(self.f, "r:gz" if _gzipped(self.f) else "r:")
            self.members = {}
            n = 0
            while (m := self.tf.next()) is not None:
                n += 1
                if n > ARCHIVE_MEMBERS_MAX:
                    raise ImageError(f"{path}: more than {ARCHIVE_MEMBERS_MAX} files in the archive")
                try:
                    self.members["/".join(member_parts(m.name))] = m
                except ValueError:
                    continue  # a name no lookup can produce
            self.tf.members.clear()
        except ImageError:
            self.f.close()
            raise
        except tar_errors() as e:
            self.f.close()
            raise ImageError(f"{path}: not a tar archive ({e or type(e).__name__})") from None

    def close(self) -> None:
        self.f.close()

    def exists(self, rel: str) -> bool:
        return "/".join(member_parts(rel)) in self.members

    def open(self, rel: str) -> tuple[BinaryIO, int]:
        name = "/".join(member_parts(rel))
        for _ in range(LINK_HOPS):
            m = self.members.get(name)
            if m is None:
                raise ImageError(f"{self.src}: {rel} is missing from the archive")
            if m.isreg():
                return self.tf.extractfile(m), m.size
            if not (m.issym() or m.islnk()):
                raise ImageError(f"{self.src}: {rel} is not a file in the archive")
            target = m.linkname if m.islnk() else posixpath.join(posixpath.dirname(name), m.linkname)
            try:
                name = "/".join(member_parts(posixpath.normpath(target)))
            except ValueError:
                raise ImageError(f"{self.src}: {rel} links outside the archive") from None
        raise ImageError(f"{self.src}: {rel}: too many links in the archive")


def _gzipped(f) -> bool:
    head = f.read(2)
    f.seek(0)
    return head == b"\x1f\x8b"


def _json(store, rel: str, what: str) -> object:
    f, size = store.open(rel)
    with f:
        if size > JSON_MAX:
            raise ImageError(f"{store.src}: {what} is {size} bytes (at most {JSON_MAX})")
        data = f.read(JSON_MAX + 1)
    return _parse(store, data, what)


def _parse(store, data: bytes, what: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ImageError(f"{store.src}: {what} is not valid JSON") from None


def _desc(store, d: object, what: str) -> tuple[str, int, str]:
    """(digest, size, mediaType) of a descriptor, checked: a sha256 digest, a whole size."""
    if not isinstance(d, dict):
        raise ImageError(f"{store.src}: {what}: descriptor is not an object")
    digest, size, mt = d.get("digest"), d.get("size"), d.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ImageError(f"{store.src}: {what}: digest {str(digest)[:80]!r} is not sha256:<64 hex digits>")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{store.src}: {what} {digest}: size is not a whole number")
    if not isinstance(mt, str):
        raise ImageError(f"{store.src}: {what} {digest}: mediaType is not a string")
    return digest, size, mt


def _blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _blob_json(store, d: object, what: str) -> tuple[object, str, str]:
    """A JSON blob (manifest, index, config), verified against its descriptor: (value, digest, mediaType)."""
    digest, size, mt = _desc(store, d, what)
    if size > JSON_MAX:
        raise ImageError(f"{store.src}: {what} {digest} is {size} bytes (at most {JSON_MAX})")
    f, _ = store.open(_blob_path(digest))
    with f:
        v = Digested(f, digest, size, f"{store.src}: {what}")
        data = v.read(JSON_MAX + 1)
        v.finish()
    return _parse(store, data, f"{what} {digest}"), digest, mt


def _platform_ok(p: object) -> bool:
    return isinstance(p, dict) and p.get("os") == "linux" and p.get("architecture") == "amd64"


def _select(store, index: object, depth: int = 0) -> tuple[object, str]:
    """The linux/amd64 image manifest an index leads to: (manifest, its digest)."""
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list) or not index["manifests"]:
        raise ImageError(f"{store.src}: the index lists no manifests")
    cands = [d for d in index["manifests"] if isinstance(d, dict)
             and (d.get("annotations") or {}).get("vnd.docker.reference.type") != "attestation-manifest"]
    exact = [d for d in cands if _platform_ok(d.get("platform"))]
    bare = [d for d in cands if not d.get("platform")]
    if exact:
        chosen = exact[0]
    elif len(bare) == 1:
        chosen = bare[0]
    elif bare:
        raise ImageError(f"{store.src}: the index lists {len(bare)} images without a platform: cannot choose one")
    else:
        seen = sorted({f"{(d.get('platform') or {}).get('os')}/{(d.get('platform') or {}).get('architecture')}"
                       for d in cands if isinstance(d.get("platform"), dict)})
        raise ImageError(f"{store.src}: no linux/amd64 image in the index (it has: {', '.join(seen) or 'none'})")
    value, digest, mt = _blob_json(store, chosen, "manifest")
    if mt in OCI_INDEX or (isinstance(value, dict) and "manifests" in value and "layers" not in value):
        if depth >= INDEX_DEPTH:
            raise ImageError(f"{store.src}: indexes nested more than {INDEX_DEPTH} deep")
        return _select(store, value, depth + 1)
    if mt and mt not in OCI_MANIFEST:
        raise ImageError(f"{store.src}: manifest {digest} has media type {mt[:80]!r}, not an image manifest")
    return value, digest


def image_env(src: str, config: object) -> dict[str, str]:
    """The config's Env as a dict, every entry checked (the catalog refuses bad names on load)."""
    cfg = config.get("config") if isinstance(config, dict) else None
    env = (cfg or {}).get("Env") if isinstance(cfg, dict) else None
    if env is None:
        return {}
    if not isinstance(env, list) or len(env) > ENV_MAX or sum(len(str(e)) for e in env) > ENV_BYTES_MAX:
        raise ImageError(f"{src}: config Env is not a list of at most {ENV_MAX} entries, {ENV_BYTES_MAX} bytes")
    out: dict[str, str] = {}
    for e in env:
        k, eq, v = e.partition("=") if isinstance(e, str) else ("", "", "")
        if not eq or not _ENV_NAME.match(k) or "\0" in v:
            raise ImageError(f"{src}: config Env entry {str(e)[:60]!r} is not NAME=value with a valid name")
        out[k] = v
    return out


def _check_platform(src: str, config: object) -> None:
    if not isinstance(config, dict):
        raise ImageError(f"{src}: the image config is not a JSON object")
    os_, arch = config.get("os"), config.get("architecture")
    if (os_ is not None and os_ != "linux") or (arch is not None and arch != "amd64"):
        raise ImageError(f"{src}: the image is for {os_}/{arch}, not linux/amd64")


def _printable(s: object, n: int = 80) -> str:
    return "".join(c for c in str(s) if c.isprintable())[:n]


def _apply(store, layers: list[tuple[str, str, int | None]], root: Path, max_bytes: int | None,
           stage: Callable[[str], None]) -> None:
    """Apply (blob path, digest, size) layers in order, each verified while it is read."""
    with Extractor(root, store.src, max_bytes, on_note=stage) as ex:
        for i, (path, digest, size) in enumerate(layers, 1):
            f, actual = store.open(path)
            with f:
                if max_bytes is not None and actual > max_bytes:
                    raise ImageError(f"{store.src}: layer {digest} is larger than the import size limit "
                                     f"(image_import_max_size = {max_bytes} bytes)")
                stage(f"layer {i}/{len(layers)} {digest[:19]}")
                ex.apply(f"layer {i} ({digest[:19]})", Digested(f, digest, size, f"{store.src}: layer"))


def _oci(store, root: Path, max_bytes: int | None, stage: Callable[[str], None], kind: str) -> Filled:
    layout = _json(store, "oci-layout", "oci-layout")
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise ImageError(f"{store.src}: oci-layout has no imageLayoutVersion")
    index = _json(store, "index.json", "index.json")
    manifest, mdigest = _select(store, index)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise ImageError(f"{store.src}: manifest {mdigest} lists no layers")
    config, _, _ = _blob_json(store, manifest.get("config"), "config")
    _check_platform(store.src, config)
    layers = []
    for i, d in enumerate(manifest["layers"], 1):
        digest, size, mt = _desc(store, d, f"layer {i}")
        if mt not in LAYER_TYPES:
            raise ImageError(f"{store.src}: layer {digest} has media type {mt[:80]!r}, not a tar layer")
        if d.get("urls"):
            raise ImageError(f"{store.src}: layer {digest} is foreign (its bytes are elsewhere: {d['urls']!s:.80})")
        layers.append((_blob_path(digest), digest, size))
    _apply(store, layers, root, max_bytes, stage)
    return Filled(origin=f"oci {mdigest}", env=image_env(store.src, config),
                  description=f"{kind} import {_ref_name(index) or Path(store.src).name[:80]} ({mdigest[:19]})")


def _ref_name(index: dict) -> str:
    """The image's name as the index annotates it (docker, podman, skopeo), for the description only."""
    for d in index.get("manifests") or []:
        ann = d.get("annotations") if isinstance(d, dict) else None
        if isinstance(ann, dict):
            name = ann.get("io.containerd.image.name") or ann.get("org.opencontainers.image.ref.name")
            if name:
                return _printable(name)
    return ""


def _docker_legacy(store, root: Path, max_bytes: int | None, stage: Callable[[str], None]) -> Filled:
    manifest = _json(store, "manifest.json", "manifest.json")
    if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
        raise ImageError(f"{store.src}: manifest.json lists no image")
    if len(manifest) > 1:
        tags = ", ".join(_printable(t, 40) for e in manifest if isinstance(e, dict) for t in (e.get("RepoTags") or []))
        raise ImageError(f"{store.src}: the archive holds {len(manifest)} images ({tags[:200] or 'untagged'}): "
                         "save one image per archive")
    entry = manifest[0]
    cfg_path, layer_paths = entry.get("Config"), entry.get("Layers")
    m = re.search(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$", cfg_path) if isinstance(cfg_path, str) else None
    if m is None or not isinstance(layer_paths, list) or not all(isinstance(p, str) for p in layer_paths):
        raise ImageError(f"{store.src}: manifest.json: Config must name <sha256>.json and Layers the layer files")
    cdigest = "sha256:" + m.group(1)
    f, size = store.open(cfg_path)
    with f:
        if size > JSON_MAX:
            raise ImageError(f"{store.src}: config is {size} bytes (at most {JSON_MAX})")
        v = Digested(f, cdigest, size, f"{store.src}: config")
        data = v.read(JSON_MAX + 1)
        v.finish()
    config = _parse(store, data, f"config {cdigest}")
    _check_platform(store.src, config)
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_paths):
        raise ImageError(f"{store.src}: config rootfs.diff_ids does not list one digest per layer")
    for d in diff_ids:
        if not isinstance(d, str) or not _DIGEST.match(d):
            raise ImageError(f"{store.src}: config diff_id {str(d)[:80]!r} is not sha256:<64 hex digits>")
    _apply(store, [(p, d, None) for p, d in zip(layer_paths, diff_ids)], root, max_bytes, stage)
    tag = _printable((entry.get("RepoTags") or [""])[0]) if isinstance(entry.get("RepoTags"), list) else ""
    return Filled(origin=f"docker-archive {cdigest}", env=image_env(store.src, config),
                  description=f"docker-archive import {tag or Path(store.src).name[:80]} ({cdigest[:19]})")


def _with_store(store_of: Callable[[], object], fill: Callable[[object], Filled]) -> Filled:
    store = store_of()
    try:
        return fill(store)
    finally:
        store.close()


def import_oci(source: Path, name: str, out_dir: Path, catalog_path: str, *, max_bytes: int | None,
               on_stage: Callable[[str], None]) -> Image:
    """An OCI image-layout directory, or a tar of one (oci-archive), as image `name`."""
    src = Path(source)

    def fill(root: Path, work: Path, stage: Callable[[str], None]) -> Filled:
        opener = (lambda: _DirStore(src)) if src.is_dir() and not src.is_symlink() else (lambda: _TarStore(src))

        def one(store) -> Filled:
            if not store.exists("oci-layout"):
                raise ImageError(f"{src}: not an OCI image layout (no oci-layout file)")
            return _oci(store, root, max_bytes, stage, "oci")
        return _with_store(opener, one)

    return run_import("oci", src, name, Path(out_dir), catalog_path, max_bytes, on_stage, fill)


def import_docker_archive(source: Path, name: str, out_dir: Path, catalog_path: str, *, max_bytes: int | None,
                          on_stage: Callable[[str], None]) -> Image:
    """A `docker save` / `podman save` archive (classic, or an OCI layout inside, docker 25+) as image `name`."""
    src = Path(source)

    def fill(root: Path, work: Path, stage: Callable[[str], None]) -> Filled:
        def one(store) -> Filled:
            if store.exists("oci-layout") and store.exists("index.json"):
                return _oci(store, root, max_bytes, stage, "docker-archive")
            if store.exists("manifest.json"):
                return _docker_legacy(store, root, max_bytes, stage)
            raise ImageError(f"{src}: not a docker/podman save archive (no manifest.json, no OCI layout)")
        return _with_store(lambda: _TarStore(src), one)

    return run_import("docker-archive", src, name, Path(out_dir), catalog_path, max_bytes, on_stage, fill)
