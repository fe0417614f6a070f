"""Per-image policy in the catalog (max_memory, max_cpus, network, checkpoint), checked at submit by every
scheduler's filter and again on the node; image provenance in the ledger; `image build --packages`.
No VM here: the real-Slurm side is tests/test_slurm_images.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from vmwrap import appliance, request, sizing
from vmwrap.catalog import Artifact, Catalog, Image, register, render_entry
from vmwrap.checkpoint import NotSaveable, refuse_by_policy
from vmwrap.cli import main
from vmwrap.config import Settings, render
from vmwrap.errors import NodeError, UserError
from vmwrap.job import Job
from vmwrap.ledger import Ledger
from vmwrap_plugins.slurm.render import render_lua

ART = Artifact("/x", "a" * 64, 1)
SMALL = Image("small", "kernel", ART, ART, max_memory_mib=512, max_cpus=2)
CATALOG = Catalog({"small": SMALL, "free": Image("free", "kernel", ART, ART)})
TOO_MUCH = "--memory=1024M is more than image small allows (max_memory = 512M)"
TOO_MANY = "--cpus=3 is more than image small allows (max_cpus = 2)"
ENTRY = "[images.x]\nkernel={source='/a', sha256='%s', size=1}\ninitrd={source='/a', sha256='%s', size=1}\n" % (
    "a" * 64, "a" * 64)


@pytest.mark.parametrize("extra, message", [
    ("max_memory = 'lots'", "images.x.max_memory: not a size"),
    ("max_memory = '64M'", "images.x.max_memory: a VM needs at least 128M"),
    ("max_cpus = 0", "images.x.max_cpus: must be at least 1"),
    ("max_cpus = 'two'", "images.x.max_cpus: not a whole number"),
    ("memory = '1G'\nmax_memory = '512M'", "images.x.memory = 1024M is more than its max_memory = 512M"),
    ("cpus = 4\nmax_cpus = 2", "images.x.cpus = 4 is more than its max_cpus = 2"),
    ("network = 'bridge'", "images.x.network = 'bridge' is not supported: it is one of \"none\", \"nat\""),
    ("checkpoint = 'no'", "images.x.checkpoint must be true or false"),
    ("max_mem = '1G'", "images.x.max_mem is not a catalog key"),
    ("users = 'alice'", "images.x.users must be a list of names"),
])
def test_a_bad_policy_names_its_key(tmp_path, extra, message):
    p = tmp_path / "c.toml"
    p.write_text(ENTRY + extra + "\n")
    with pytest.raises(NodeError) as e:
        Catalog.load(str(p))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_policy_round_trips_through_the_catalog_file(tmp_path):
    p = tmp_path / "c.toml"
    img = Image("pol", "kernel", ART, ART, memory_mib=256, max_memory_mib=1024, max_cpus=2, checkpoint=False)
    register(str(p), img)
    got = Catalog.load(str(p)).images["pol"]
    assert (got.max_memory_mib, got.max_cpus, got.network, got.checkpoint) == (1024, 2, "none", False)
    assert "checkpoint = false" in render_entry(img) and "network" not in render_entry(img)
    register(str(p), Image("open", "kernel", ART, ART))
    assert Catalog.load(str(p)).images["open"].checkpoint is True
    register(str(p), Image("net", "kernel", ART, ART, network="nat"))
    assert Catalog.load(str(p)).images["net"].network == "nat"


def test_an_invalid_entry_never_reaches_the_catalog_file(tmp_path):
    p = tmp_path / "c.toml"
    register(str(p), Image("ok", "kernel", ART, ART))
    before = p.read_text()
    with pytest.raises(NodeError, match="images.bad.memory = 1024M is more than its max_memory = 512M"):
        register(str(p), Image("bad", "kernel", ART, ART, memory_mib=1024, max_memory_mib=512))
    assert p.read_text() == before and list(Catalog.load(str(p)).images) == ["ok"]


def test_resolve_refuses_a_request_above_the_image_policy():
    with pytest.raises(UserError, match=re.escape(TOO_MUCH)):
        CATALOG.resolve("small", "root", memory_mib=1024)
    with pytest.raises(UserError, match=re.escape(TOO_MANY)):
        CATALOG.resolve("small", "root", cpus=3)
    assert CATALOG.resolve("small", "root", memory_mib=512, cpus=2) is SMALL
    assert CATALOG.resolve("free", "root", memory_mib=4096, cpus=64).name == "free"


def test_on_the_node_a_request_is_refused_and_defaults_and_allocations_are_capped():
    s = Settings(default_memory_mib=1024, default_cpus=1)
    job = Job("7", "slurm", "root", 0, 0, "/tmp", "#!/bin/sh\n#VMWRAP --image=small --memory=1G\n")
    with pytest.raises(UserError, match=re.escape(TOO_MUCH)):
        request.resolve(job, s, CATALOG)
    # no request: the site's default (1024M) and the allocation (8 CPUs) are capped by the image, not refused
    assert sizing.memory_mib(None, SMALL, s) == (512, "image small's max_memory of 512M")
    assert sizing.cpus(None, 8, SMALL, s) == 2
    assert sizing.cpus(None, 8, CATALOG.images["free"], s) == 8


HARNESS = r"""
slurm = { SUCCESS = 0, ERROR = -1, msgs = {} }
function slurm.log_user(m) table.insert(slurm.msgs, m) end
dofile(arg[1])
local job = { script = io.read("*a"), user_name = "root", group_id = 0 }
local rc = slurm_job_submit(job, {}, 0)
io.write(rc, "\n", table.concat(slurm.msgs, "\n"))
"""


@pytest.mark.parametrize("directives, message", [
    ("--image=small --memory=1G", "vmwrap: " + TOO_MUCH),
    ("--image=small --cpus=3", "vmwrap: " + TOO_MANY),
    ("--image=small --memory=512M --cpus=2", ""),
    ("--image=free --memory=8G --cpus=64", ""),
])
def test_slurm_lua_filter_refuses_with_the_cores_message(tmp_path, directives, message):
    (tmp_path / "job_submit.lua").write_text(render_lua(CATALOG))
    (tmp_path / "harness.lua").write_text(HARNESS)
    r = subprocess.run(["lua5.1", str(tmp_path / "harness.lua"), str(tmp_path / "job_submit.lua")],
                       input=f"#!/bin/sh\n#VMWRAP {directives}\necho hi\n", capture_output=True, text=True, check=True)
    rc, _, msg = r.stdout.partition("\n")
    assert (int(rc), msg) == ((-1, message) if message else (0, ""))


@pytest.fixture
def catalog_file(tmp_path):
    p = tmp_path / "images.toml"
    register(str(p), SMALL)
    return Settings(catalog=str(p), state_dir=str(tmp_path / "state"))


def test_grid_engine_jsv_and_torque_filter_refuse_it_too(catalog_file, tmp_path):
    from vmwrap_plugins.sge.hooks import check_request
    from vmwrap_plugins.torque import submit

    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n#VMWRAP --image=small --memory=1G\necho hi\n")
    assert check_request(catalog_file, {"CMDNAME": str(script)}, "root", 0) == (None, None, TOO_MUCH)
    with pytest.raises(UserError, match=re.escape(TOO_MANY)):
        submit.check(catalog_file, [], "#!/bin/sh\n#VMWRAP --image=small --cpus=3\n", "root", 0)


def test_a_checkpoint_false_image_is_never_saved(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"image": "nockpt", "checkpoint": False}))
    with pytest.raises(NotSaveable, match=r"image nockpt may not be saved \(checkpoint = false"):
        refuse_by_policy(tmp_path)
    (tmp_path / "job.json").write_text(json.dumps({"image": "ok", "checkpoint": True}))
    refuse_by_policy(tmp_path)
    (tmp_path / "job.json").write_text(json.dumps({"image": "old"}))  # booted by an older vmwrap: as before
    refuse_by_policy(tmp_path)


def test_ledger_provenance_reads_old_and_new_records(tmp_path):
    led = Ledger(tmp_path / "ledger.db")
    led.record("1", "vmwrap-1", "created", image="busybox", cpus=1)  # an older vmwrap's record
    led.record("2", "vmwrap-2", "created", image="deb", digest="sha256:" + "b" * 64, origin="appliance debootstrap")
    led.record("2", "vmwrap-2", "exited")
    got = led.provenance()
    assert got["1"] == {"image": "busybox", "digest": None, "origin": None}
    assert got["2"] == {"image": "deb", "digest": "sha256:" + "b" * 64, "origin": "appliance debootstrap"}


@pytest.mark.parametrize("bad", ["Python3", "a", "-rf", "x;rm", "../x", "py thon", "p\u00e9", "--include=x"])
def test_package_names_follow_debian_grammar(bad):
    with pytest.raises(UserError, match="is not a Debian package name"):
        appliance.check_packages(["python3-minimal", bad])
    assert appliance.check_packages(["python3-minimal", "g++", "libc6.1-dev", "xz-utils"])


def test_image_build_with_a_bad_package_is_one_line_and_leaves_nothing(tmp_path):
    cfg = tmp_path / "vmwrap.toml"
    out = tmp_path / "appliances"
    cfg.write_text(render({"catalog": str(tmp_path / "images.toml"), "state_dir": str(tmp_path / "state"),
                           "appliance_dir": str(out)}))
    for args, message in [
        (["--kind", "debootstrap", "--packages", "python3,Bad_Name"], "'Bad_Name' is not a Debian package name"),
        (["--kind", "busybox", "--packages", "python3"], "--packages needs --kind debootstrap"),
        (["--kind", "debootstrap", "--max-memory", "200M"], "--memory=256M is more than --max-memory=200M"),
    ]:
        r = subprocess.run([sys.executable, "-m", "vmwrap.cli", "--config", str(cfg), "image", "build", "--name",
                            "py", *args], capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.strip().splitlines() == [f"Error: {r.stderr.strip()[7:]}"], r.stderr
        assert message in r.stderr
    assert not (tmp_path / "images.toml").exists() and not (out / "py").exists()


def test_image_list_shows_policy_and_provenance(tmp_path):
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(render({"catalog": str(tmp_path / "images.toml"), "state_dir": str(tmp_path / "state")}))
    register(str(tmp_path / "images.toml"), Image("small", "kernel", ART, ART, max_memory_mib=512, max_cpus=2,
                                                  checkpoint=False, origin="appliance busybox"))
    r = CliRunner().invoke(main, ["--config", str(cfg), "image", "list", "--json"])
    [doc] = json.loads(r.stdout)
    assert (doc["max_memory_mib"], doc["max_cpus"], doc["network"], doc["checkpoint"]) == (512, 2, "none", False)
    assert doc["digest"] == SMALL.digest and doc["origin"] == "appliance busybox"
    table = CliRunner().invoke(main, ["--config", str(cfg), "image", "list"]).stdout
    assert "mem<=512M cpus<=2 no-ckpt" in table


def test_build_passes_packages_to_debootstrap_and_sizes_the_disk_from_the_tree(tmp_path, monkeypatch):
    """debootstrap gets --include with the checked names; a tree larger than 1 GiB gets a larger disk."""
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        if argv[0] == "debootstrap":
            root = tmp_path / "rootfs"
            root.mkdir(parents=True, exist_ok=True)
            with open(root / "big", "wb") as f:  # 1.2 GiB of allocated blocks would be slow: fake the count
                f.write(b"x")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(appliance, "_run", fake_run)
    monkeypatch.setattr(appliance, "tree_mib", lambda root: 1200)
    appliance.build_debootstrap_root(tmp_path / "root.qcow2", tmp_path, packages=["python3-minimal"],
                                     debs=tmp_path / "debs")
    deb = next(c for c in calls if c[0] == "debootstrap")
    assert "--include=python3-minimal" in deb and f"--cache-dir={tmp_path / 'debs'}" in deb
    mkfs = next(c for c in calls if c[0] == "mkfs.ext4")
    assert mkfs[-1] == f"{1200 * 5 // 4 + 256}M"
    with pytest.raises(UserError):
        appliance.build_debootstrap_root(tmp_path / "r2", tmp_path, packages=["$(reboot)"])
    assert os.path.exists(tmp_path / "debs")
