"""Image archives for import tests, written here byte by byte (no docker, podman or apptainer needed):
tar layers (good and hostile), OCI image layouts, classic and OCI-style docker save archives, SIF files
(header and descriptors as github.com/apptainer/sif pkg/sif lays them out) around a mksquashfs partition.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import uuid
from pathlib import Path

# -- tar layers ----------------------------------------------------------------------------------


def entry(name: str, kind: str = "file", data: bytes = b"", target: str = "", mode: int | None = None,
          uid: int = 0, gid: int = 0) -> tuple[tarfile.TarInfo, bytes]:
    """One tar member: kind file, dir, symlink, hardlink, fifo, chardev."""
    ti = tarfile.TarInfo(name)
    ti.uid, ti.gid, ti.mtime = uid, gid, 1700000000
    types = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
             "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE}
    ti.type = types[kind]
    ti.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    ti.linkname = target
    if kind == "file":
        ti.size = len(data)
    if kind == "chardev":
        ti.devmajor, ti.devminor = 1, 3
    return ti, data


def whiteout(path: str) -> tuple[tarfile.TarInfo, bytes]:
    d, _, base = path.rpartition("/")
    return entry(f"{d}/.wh.{base}" if d else f".wh.{base}")


def opaque(dir_path: str) -> tuple[tarfile.TarInfo, bytes]:
    return entry(f"{dir_path}/.wh..wh..opq")


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes]], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


def tree_tar(root: Path, dest: Path, compress: bool = False, extra: list[tuple[tarfile.TarInfo, bytes]] = ()) -> Path:
    """A tar of a directory tree as `tar -C root -c .` writes it (owners, modes, links kept), plus `extra`."""
    opener = gzip.open(dest, "wb", compresslevel=1) if compress else open(dest, "wb")
    with opener as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for n in sorted(dirs) + sorted(files):
                p = Path(d) / n
                tf.add(p, arcname=str(p.relative_to(root)), recursive=False)
        for ti, data in extra:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return dest


# -- blobs, OCI layouts, docker saves -------------------------------------------------------------


def _digest_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return "sha256:" + h.hexdigest(), path.stat().st_size


def add_blob(layout: Path, data: bytes | Path) -> dict:
    """Store bytes or a file in layout/blobs/sha256; its descriptor (digest, size)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        digest, size = _digest_file(data)
        shutil.copyfile(data, blobs / digest[7:])
    else:
        digest, size = "sha256:" + hashlib.sha256(data).hexdigest(), len(data)
        (blobs / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": size}


def config(env: list[str], diff_ids: list[str], arch: str = "amd64") -> bytes:
    return json.dumps({"architecture": arch, "os": "linux",
                       "config": {"Env": env, "WorkingDir": "/nowhere", "User": "nobody"},
                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


def _diff_id(layer: bytes | Path) -> str:
    if isinstance(layer, Path):
        with open(layer, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            h = hashlib.sha256()
            with gzip.open(layer, "rb") as g:
                while b := g.read(1 << 20):
                    h.update(b)
            return "sha256:" + h.hexdigest()
        return _digest_file(layer)[0]
    raw = gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def oci_layout(dest: Path, layers: list[bytes | Path], env: list[str] = (), *, arch: str = "amd64",
               other_platform: bool = False, ref: str = "test:latest") -> str:
    """An OCI image layout in `dest` (gzip layers); an index with a linux/arm64 image first when
    `other_platform`. Returns the amd64 manifest's digest."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descs = []
    for layer in layers:
        d = add_blob(dest, layer)
        gz = (layer[:2] if isinstance(layer, bytes) else open(layer, "rb").read(2)) == b"\x1f\x8b"
        d["mediaType"] = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else "")
        descs.append(d)
    cfg = add_blob(dest, config(list(env), [_diff_id(x) for x in layers], arch))
    cfg["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg, "layers": descs}
    m = add_blob(dest, json.dumps(manifest).encode())
    m.update(mediaType="application/vnd.oci.image.manifest.v1+json",
             platform={"os": "linux", "architecture": arch}, annotations={"org.opencontainers.image.ref.name": ref})
    manifests = [m]
    if other_platform:  # a manifest for another platform, listed first (its blob is never read)
        manifests.insert(0, {"mediaType": m["mediaType"], "digest": "sha256:" + "0" * 64, "size": 10,
                             "platform": {"os": "linux", "architecture": "arm64"}})
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return m["digest"]


def tar_dir(src: Path, dest: Path) -> Path:
    """A tar of a directory's contents (an OCI layout as docker 25+ and `podman save --format oci-archive` write)."""
    with tarfile.open(dest, "w") as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(src)), recursive=False)
    return dest


def docker_archive(dest: Path, layers: list[bytes | Path], env: list[str] = (), tag: str = "test:latest",
                   link_to: str | None = None, link_up: str = "../") -> str:
    """A classic `docker save` archive (uncompressed layer tars in <id>/layer.tar); returns the config
    (image id) digest. `link_to`: each <id>/layer.tar is a symlink to a tar kept under that directory
    instead (docker links a layer saved twice to its first copy), reached through `link_up`."""
    work = dest.parent / (dest.name + ".d")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    paths, diff_ids = [], []
    for i, layer in enumerate(layers):
        raw = work / f"l{i}.tar"
        if isinstance(layer, Path):
            if open(layer, "rb").read(2) == b"\x1f\x8b":
                with gzip.open(layer, "rb") as g, open(raw, "wb") as f:
                    shutil.copyfileobj(g, f)
            else:
                shutil.copyfile(layer, raw)
        else:
            raw.write_bytes(gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer)
        digest, _ = _digest_file(raw)
        diff_ids.append(digest)
        d = work / hashlib.sha256(f"v1 {i} {digest}".encode()).hexdigest()
        d.mkdir()
        if link_to is None:
            os.rename(raw, d / "layer.tar")
        else:
            (work / link_to).mkdir(parents=True, exist_ok=True)
            os.rename(raw, work / link_to / f"{i}.tar")
            os.symlink(f"{link_up}{link_to}/{i}.tar", d / "layer.tar")
        (d / "VERSION").write_text("1.0")
        paths.append(f"{d.name}/layer.tar")
    cfg = config(list(env), diff_ids)
    cdigest = "sha256:" + hashlib.sha256(cfg).hexdigest()
    (work / f"{cdigest[7:]}.json").write_bytes(cfg)
    (work / "manifest.json").write_text(json.dumps([{"Config": f"{cdigest[7:]}.json", "RepoTags": [tag],
                                                     "Layers": paths}]))
    (work / "repositories").write_text(json.dumps({tag.split(":")[0]: {tag.split(":")[1]: paths[-1].split("/")[0]}}))
    tar_dir(work, dest)
    shutil.rmtree(work)
    return cdigest


# -- SIF ------------------------------------------------------------------------------------------

SIF_HEADER = struct.Struct("<32s10s3s3s16s8q")
SIF_DESCRIPTOR = struct.Struct("<iBIII7q128s384s")
DATA_DEFFILE, DATA_PARTITION = 0x4001, 0x4004


def squashfs(tree: Path, dest: Path) -> Path:
    subprocess.run(["/usr/bin/mksquashfs", str(tree), str(dest), "-noappend", "-quiet", "-no-progress",
                    "-comp", "gzip"], check=True, stdout=subprocess.DEVNULL)
    return dest


def sif(dest: Path, partition: Path, *, fstype: int = 1, parttype: int = 2, arch: bytes = b"02\0",
        deffile: bytes = b"Bootstrap: docker\nFrom: debian:bookworm\n") -> None:
    """A SIF (spec version 01) with a definition file object and one partition object (squashfs,
    primary system, amd64 by default), data 4096-aligned as `apptainer build` writes it."""
    ndesc, doff = 48, 4096
    data_off = doff + ndesc * SIF_DESCRIPTOR.size
    def_off = data_off
    part_off = (def_off + len(deffile) + 4095) // 4096 * 4096
    psize = partition.stat().st_size
    end = part_off + psize

    def desc(dtype, ident, off, size, extra=b""):
        return SIF_DESCRIPTOR.pack(dtype, 1, ident, 0xF0000001, 0, off, size, size, 1700000000, 1700000000, 0, 0,
                                   b"", extra)

    descs = desc(DATA_DEFFILE, 1, def_off, len(deffile))
    descs += desc(DATA_PARTITION, 2, part_off, psize, struct.pack("<ii3s", fstype, parttype, arch))
    descs += b"\0" * (ndesc - 2) * SIF_DESCRIPTOR.size
    header = SIF_HEADER.pack(b"#!/usr/bin/env run-singularity\n", b"SIF_MAGIC\0", b"01\0", b"02\0",
                             uuid.uuid4().bytes, 1700000000, 1700000000, ndesc - 2, ndesc, doff,
                             ndesc * SIF_DESCRIPTOR.size, data_off, end - data_off)
    with open(dest, "wb") as f:
        f.write(header)
        f.seek(doff)
        f.write(descs)
        f.seek(def_off)
        f.write(deffile)
        f.seek(part_off)
        with open(partition, "rb") as p:
            shutil.copyfileobj(p, f)
