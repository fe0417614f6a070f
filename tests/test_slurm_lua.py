"""The rendered job_submit.lua under Lua 5.1 (what Slurm 22.05 links), against the Python parser's cases."""

import subprocess

import pytest

from vmwrap_plugins.slurm.render import lua_literal, render_lua
from vmwrap import directives, wire
from vmwrap.catalog import Artifact, Catalog, Image
from vmwrap.errors import UserError

ART = Artifact("/x", "a" * 64, 1)
CATALOG = Catalog({
    "busybox": Image("busybox", "kernel", ART, ART),
    "private": Image("private", "kernel", ART, ART, users=["alice"]),
    "grp": Image("grp", "kernel", ART, ART, groups=["root"]),
})

HARNESS = r"""
slurm = { SUCCESS = 0, ERROR = -1, msgs = {} }
function slurm.log_user(m) table.insert(slurm.msgs, m) end
dofile(arg[1])
local script = io.read("*a")
if arg[7] == "interactive" then script = nil end  -- salloc / srun: no batch script
local job = { script = script, user_name = arg[2], group_id = tonumber(arg[3]),
              min_nodes = tonumber(arg[4]), min_mem_per_node = tonumber(arg[5]),
              container = arg[6] ~= "" and arg[6] or nil, argc = tonumber(arg[8]) }
local rc = slurm_job_submit(job, {}, 1000)
io.write(rc, "\n", table.concat(slurm.msgs, "\n"), "\n--SCRIPT--\n", job.script or "", "\n--COMMENT--\n",
         job.comment or "", "\n--MEM--\n", tostring(job.min_mem_per_node), "\n")
"""


@pytest.fixture(scope="module")
def lua(tmp_path_factory):
    d = tmp_path_factory.mktemp("lua")
    (d / "job_submit.lua").write_text(render_lua(CATALOG, "/usr/local/bin/vmwrap", "/etc/vmwrap/vm %n.toml"))
    (d / "harness.lua").write_text(HARNESS)

    def submit(script, user="root", gid=0, nodes=4294967294, mem=4294967294, container="", argc=0):
        """script None: an interactive submission (salloc: argc 0; srun CMD: argc > 0)."""
        r = subprocess.run(["lua5.1", str(d / "harness.lua"), str(d / "job_submit.lua"), user, str(gid), str(nodes),
                            str(mem), container, "batch" if script is not None else "interactive", str(argc)],
                           input=script or "", capture_output=True, text=True, check=True)
        rc, rest = r.stdout.split("\n", 1)
        msg, rest = rest.split("\n--SCRIPT--\n", 1)
        new_script, rest = rest.split("\n--COMMENT--\n", 1)
        comment, mem_out = rest.split("\n--MEM--\n", 1)
        return int(rc), msg.strip(), new_script, comment, mem_out.strip()
    return submit


CASES = [
    "--image=nope", "--image=../x", "--image='busybox'", '--image=a"b', "--image=<x>", "--image=a&b",
    "--image=busy box", "--image=", "--image", "", "image=x", "--imgae=x", "--image=a --image=b",
    "--memory=0", "--memory=-5G", "--memory=lots", "--memory=99999999999T", "--cpus=0", "--cpus=-2",
    "--cpus=two", "--cpus=1.5", "--cpus=100000", "--on-lost-checkpoint=maybe", "--image=busybox --gpu=1",
]


@pytest.mark.parametrize("directive", CASES)
def test_lua_rejects_what_python_rejects_with_the_same_message(lua, directive):
    script = f"#!/bin/sh\n#VMWRAP {directive}\necho hi\n"
    try:
        req = directives.parse(script)
        expected = None
    except UserError as e:
        expected = str(e)
    rc, msg, _, _, _ = lua(script)
    if expected is None:  # valid syntax: only the catalog can refuse it
        assert req.image == "nope" and rc == -1 and "unknown image 'nope'" in msg
    else:
        assert rc == -1
        assert msg == "vmwrap: " + expected


def test_accepted_job_is_wrapped_and_recorded(lua):
    script = "#!/bin/bash\n#SBATCH -n 1\n#VMWRAP --image=busybox --memory=300M --cpus=1\necho hi\n"
    rc, msg, new, comment, mem = lua(script)
    assert rc == 0 and msg == ""
    assert comment == "vmwrap:image=busybox,memory=300,cpus=1,lost="
    head, marker, original = new.partition("#VMWRAP-ORIGINAL-SCRIPT\n")
    assert original == script
    assert "exec /usr/local/bin/vmwrap --config '/etc/vmwrap/vm %n.toml' slurm attach \"$0\" \"$@\"" in head
    assert mem == "300"  # Slurm allocates what the VM will use


COMMENT_HARNESS = r"""
slurm = { SUCCESS = 0, ERROR = -1, msgs = {} }
function slurm.log_user(m) table.insert(slurm.msgs, m) end
dofile(arg[1])
local job = { script = io.read("*a"), comment = arg[2] ~= "" and arg[2] or nil, user_name = "root", group_id = 0,
              min_nodes = 1, min_mem_per_node = 4294967294 }
local rc = slurm_job_submit(job, {}, 0)
io.write(rc, "\n", table.concat(slurm.msgs, "\n"), "\n--COMMENT--\n", job.comment or "")
"""


def _submit_with_comment(tmp_path, directives_line, comment=""):
    (tmp_path / "job_submit.lua").write_text(render_lua(CATALOG))
    (tmp_path / "harness.lua").write_text(COMMENT_HARNESS)
    r = subprocess.run(["lua5.1", str(tmp_path / "harness.lua"), str(tmp_path / "job_submit.lua"), comment],
                       input=f"#!/bin/sh\n#VMWRAP {directives_line}\necho hi\n", capture_output=True, text=True,
                       check=True)
    head, _, written = r.stdout.partition("\n--COMMENT--\n")
    return head.strip(), written


@pytest.mark.parametrize("line, comment, accepted", [
    ("--image=busybox", "", wire.Accepted("busybox")),
    ("--image=grp --memory=2G --cpus=3 --on-lost-checkpoint=restart", "",
     wire.Accepted("grp", memory_mib=2048, cpus=3, on_lost_checkpoint="restart")),
    ("--image=busybox --on-lost-checkpoint=fail", "my project | x", wire.Accepted("busybox", on_lost_checkpoint="fail")),
])
def test_the_filter_writes_what_the_hooks_decode(tmp_path, line, comment, accepted):
    """job_submit.lua's comment is vmwrap.wire's encoding: the root prolog, planner and prestager read it back."""
    rc, written = _submit_with_comment(tmp_path, line, comment)
    assert rc == "0"
    assert wire.decode(written) == accepted
    assert written == wire.encode(accepted) + (wire.USER_SEPARATOR + comment if comment else "")


def test_the_filter_takes_its_request_format_from_vmwrap_wire(tmp_path, monkeypatch):
    """One owner of the format: change it in vmwrap/wire.py and the rendered filter follows."""
    monkeypatch.setattr(wire, "PREFIX", "vmwrap2:")
    monkeypatch.setattr(wire, "USER_SEPARATOR", " // ")
    rc, written = _submit_with_comment(tmp_path, "--image=busybox --cpus=2", "note")
    assert (rc, written) == ("0", "vmwrap2:image=busybox,memory=,cpus=2,lost= // note")


def test_job_without_directive_is_untouched(lua):
    rc, _, new, comment, _ = lua("#!/bin/sh\necho bare\n")
    assert rc == 0 and new == "#!/bin/sh\necho bare\n" and comment == ""


def test_rights_users_and_groups(lua):
    assert lua("#!/bin/sh\n#VMWRAP --image=private\n", user="alice")[0] == 0
    rc, msg, *_ = lua("#!/bin/sh\n#VMWRAP --image=private\n", user="bob", gid=4242)
    assert rc == -1 and msg == "vmwrap: user 'bob' may not use image 'private' (ask your admin to be added)"
    assert lua("#!/bin/sh\n#VMWRAP --image=grp\n", user="bob", gid=0)[0] == 0  # primary group root


def test_multi_node_vm_jobs_are_accepted_but_not_with_periodic_checkpoints(lua):
    """A VM on each node (vmwrap/jobnet.py joins them); such VMs are never saved, so no --checkpoint-every."""
    assert lua("#!/bin/sh\n#VMWRAP --image=busybox\n", nodes=2)[:2] == (0, "")
    rc, msg, *_ = lua("#!/bin/sh\n#VMWRAP --image=busybox --checkpoint-every=3600\n", nodes=2)
    assert (rc, msg) == (-1, "vmwrap: --checkpoint-every is for jobs on one node: the VMs of a job on 2 nodes are "
                             "not saved")
    assert lua("#!/bin/sh\n#VMWRAP --image=busybox --checkpoint-every=3600\n", nodes=1)[:2] == (0, "")


def test_memory_above_allocation_rejected(lua):
    rc, msg, *_ = lua("#!/bin/sh\n#VMWRAP --image=busybox --memory=2G\n", mem=1024)
    assert rc == -1 and msg == "vmwrap: --memory=2048M is more than the job's allocation of 1024M (--mem)"


def test_salloc_container_asks_for_a_vm_and_passes_every_check_a_batch_job_does(lua):
    """`salloc --container=IMAGE`: the request goes into the comment (the prolog boots the VM); no script."""
    rc, msg, new, comment, _ = lua(None, container="busybox")
    assert (rc, msg, new, comment) == (0, "", "", "vmwrap:image=busybox,memory=,cpus=,lost=")
    assert wire.decode(comment) == wire.Accepted("busybox")
    assert lua(None, user="alice", container="private")[0] == 0
    refused = {
        "nope": "vmwrap: unknown image 'nope' (this site offers: busybox)",
        "../x": "vmwrap: --container: invalid image name '../x': use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (no paths, quotes, spaces or markup)",
        "private": "vmwrap: user 'bob' may not use image 'private' (ask your admin to be added)",
    }
    for image, why in refused.items():
        rc, msg, _, comment, _ = lua(None, user="bob", gid=4242, container=image)
        assert (rc, msg, comment) == (-1, why, ""), image
    assert lua(None, container="busybox", nodes=2)[:2] == (0, "")   # salloc -N 2: a VM on each node


def test_interactive_jobs_without_a_container_are_untouched(lua):
    assert lua(None)[:4] == (0, "", "", "")
    assert lua(None, argc=2)[:4] == (0, "", "", "")


def test_srun_container_outside_an_allocation_is_refused_with_what_to_use(lua):
    """srun's command would start on the node, not in the VM: refused, naming salloc and sbatch."""
    rc, msg, _, comment, _ = lua(None, container="busybox", argc=1)
    assert rc == -1 and comment == ""
    assert msg.startswith("vmwrap: srun --container=IMAGE starts its command on the node, not in a VM: use "
                          "`salloc --container=IMAGE`") and "#VMWRAP --image=IMAGE" in msg


def test_sbatch_container_names_the_image_like_a_directive(lua):
    rc, msg, new, comment, _ = lua("#!/bin/sh\necho hi\n", container="busybox")
    assert (rc, msg, comment) == (0, "", "vmwrap:image=busybox,memory=,cpus=,lost=")
    assert new.endswith("#VMWRAP-ORIGINAL-SCRIPT\n#!/bin/sh\necho hi\n") and " slurm attach " in new
    same = lua("#!/bin/sh\n#VMWRAP --image=busybox --cpus=1\n", container="busybox")
    assert (same[0], same[3]) == (0, "vmwrap:image=busybox,memory=,cpus=1,lost=")
    rc, msg, _, comment, _ = lua("#!/bin/sh\n#VMWRAP --image=grp\n", container="busybox")
    assert (rc, msg, comment) == (-1, "vmwrap: --container=busybox and #VMWRAP --image=grp name different images: "
                                      "give one", "")


def test_lua_literal_escapes_everything():
    s = 'a"b\\c\nd]]e\x00é'
    out = subprocess.run(["lua5.1", "-e", f"io.write({lua_literal(s)})"], capture_output=True, check=True).stdout
    assert out == s.encode()


def test_site_default_image_wraps_jobs_without_directive(tmp_path):
    (tmp_path / "job_submit.lua").write_text(render_lua(CATALOG, default_image="busybox"))
    (tmp_path / "harness.lua").write_text(HARNESS)
    r = subprocess.run(["lua5.1", str(tmp_path / "harness.lua"), str(tmp_path / "job_submit.lua"), "bob", "1",
                        "1", "4294967294"], input="#!/bin/sh\necho bare\n", capture_output=True, text=True, check=True)
    assert r.stdout.startswith("0\n")
    assert "vmwrap:image=busybox," in r.stdout and "#VMWRAP-ORIGINAL-SCRIPT\n#!/bin/sh\necho bare\n" in r.stdout


def test_site_default_image_gives_salloc_a_vm_and_leaves_srun_alone(tmp_path):
    """With a default image every salloc's shell is in a VM; `srun CMD` without --container stays bare."""
    (tmp_path / "job_submit.lua").write_text(render_lua(CATALOG, default_image="busybox"))
    (tmp_path / "harness.lua").write_text(HARNESS)

    def submit(argc: int) -> list[str]:
        r = subprocess.run(["lua5.1", str(tmp_path / "harness.lua"), str(tmp_path / "job_submit.lua"), "bob", "1",
                            "1", "4294967294", "", "interactive", str(argc)], input="", capture_output=True,
                           text=True, check=True)
        return r.stdout.split("\n")
    out = submit(0)
    assert out[0] == "0" and "vmwrap:image=busybox,memory=,cpus=,lost=" in out
    out = submit(2)
    assert out[0] == "0" and not any(ln.startswith("vmwrap:") for ln in out)


def test_prefer_nodes_holding_the_image_only_when_safe(tmp_path):
    active = tmp_path / "vmwrap-active.lua"
    (tmp_path / "job_submit.lua").write_text(render_lua(CATALOG, active_file=str(active)))

    def prefer(script, **fields):
        extra = "".join(f", {k} = {v!r}" if isinstance(v, str) else f", {k} = {v}" for k, v in fields.items())
        h = HARNESS.replace('"\\n--MEM--\\n"', '"\\n--PREFER--\\n", tostring(job.prefer), "\\n--MEM--\\n"')
        h = h.replace("argc = tonumber(arg[8]) }", "argc = tonumber(arg[8])" + extra + " }")
        (tmp_path / "harness.lua").write_text(h.replace("'", '"') if False else h)
        r = subprocess.run(["lua5.1", str(tmp_path / "harness.lua"), str(tmp_path / "job_submit.lua"), "root", "0",
                            "1", "4294967294"], input=script, capture_output=True, text=True, check=True)
        return r.stdout.split("--PREFER--\n")[1].split("\n")[0]

    job = "#!/bin/sh\n#VMWRAP --image=busybox\n"
    assert prefer(job) == "nil"  # no file yet: Slurm would refuse a prefer no node has
    active.write_text('return {default="debug", images={["busybox"]={["debug"]={cpus=2,mem=3000}}}}\n')
    assert prefer(job) == "vmw_busybox"
    assert prefer(job, partition="debug") == "vmw_busybox"
    assert prefer(job, partition="high") == "nil"  # no holder in that partition
    assert prefer(job, req_nodes="c2") == "nil"
    assert prefer(job, exc_nodes="c1") == "nil"
    assert prefer(job, features="gpu") == "nil"
    assert prefer(job, min_cpus=4) == "nil"  # holders too small: prefer would make Slurm refuse the job
    assert prefer("#!/bin/sh\n#VMWRAP --image=busybox --memory=4G\n") == "nil"
    assert prefer("#!/bin/sh\n#VMWRAP --image=grp\n") == "nil"
    assert prefer(job, prefer="fast") == "fast"  # the user's own preference wins
    active.write_text("this is not lua")
    assert prefer(job) == "nil"  # a broken file never breaks submission


# Issue 14: the comment carries the VM request the root prolog acts on; only the filter may write it.
FORGE_HARNESS = r"""
slurm = { SUCCESS = 0, ERROR = -1, msgs = {} }
function slurm.log_user(m) table.insert(slurm.msgs, m) end
dofile(arg[1])
local function opt(s) if s == "<nil>" then return nil end return s end
local rc
if arg[2] == "submit" then
  local job = { script = opt(io.read("*a")), comment = opt(arg[3]), user_name = "bob", group_id = 4242,
                min_nodes = 1, min_mem_per_node = 4294967294 }
  rc = slurm_job_submit(job, {}, 1234)
else
  rc = slurm_job_modify({ comment = opt(arg[3]), min_nodes = tonumber(arg[6] or "") },
                        { comment = opt(arg[4]) }, {}, tonumber(arg[5]))
end
io.write(rc, "\n", table.concat(slurm.msgs, "\n"), "\n")
"""


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    d = tmp_path_factory.mktemp("forge")
    (d / "job_submit.lua").write_text(render_lua(CATALOG))
    (d / "harness.lua").write_text(FORGE_HARNESS)

    def call(*args, stdin=""):
        r = subprocess.run(["lua5.1", str(d / "harness.lua"), str(d / "job_submit.lua"), *map(str, args)],
                           input=stdin, capture_output=True, text=True, check=True)
        rc, msg = r.stdout.split("\n", 1)
        return int(rc), msg.strip()
    return call


FORGED = "vmwrap:image=busybox,memory=200000,cpus=,lost="


@pytest.mark.parametrize("script", ["#!/bin/sh\necho no directive\n", "#!/bin/sh\n#VMWRAP --image=busybox\n", "<nil>"])
def test_submit_refuses_a_comment_that_forges_a_vm_request(forge, script):
    rc, msg = forge("submit", FORGED, stdin=script if script != "<nil>" else "<nil>")
    assert rc == -1
    assert msg == "vmwrap: a job's comment may not start with 'vmwrap:': vmwrap writes the job's VM request there"


def test_submit_refuses_line_breaks_in_a_comment(forge):
    rc, msg = forge("submit", "ok\n1|2026-12-02T10:00:00|c1|" + FORGED, stdin="#!/bin/sh\necho hi\n")
    assert (rc, msg) == (-1, "vmwrap: a job's comment may not contain line breaks")


def test_submit_keeps_an_ordinary_comment(forge):
    assert forge("submit", "my project vmwrap: later", stdin="#!/bin/sh\necho hi\n") == (0, "")


@pytest.mark.parametrize("script", [
    "#!/bin/sh\n#VMWRAP-ORIGINAL-SCRIPT\n#VMWRAP --image=busybox --memory=99G\n",   # skips every check
    "#!/bin/sh\necho hi\n#VMWRAP-ORIGINAL-SCRIPT\n",
])
def test_submit_refuses_a_script_that_holds_the_marker(forge, script):
    rc, msg = forge("submit", "<nil>", stdin=script)
    assert rc == -1
    assert msg == ("vmwrap: the script contains #VMWRAP-ORIGINAL-SCRIPT, which vmwrap reserves for scripts "
                   "it wrapped")


@pytest.mark.parametrize("new, cur, uid, refused", [
    (FORGED, "", 1234, "a job's comment may not start with 'vmwrap:'"),          # a job without a request gets one
    (FORGED, "<nil>", 1234, "a job's comment may not start with 'vmwrap:'"),
    (FORGED, "plain", 1234, "a job's comment may not start with 'vmwrap:'"),
    ("plain", FORGED, 1234, "the job's comment carries its VM request and cannot be changed"),
    ("", FORGED, 1234, "the job's comment carries its VM request and cannot be changed"),
    ("a\nb", "plain", 1234, "a job's comment may not contain line breaks"),
    ("other", "plain", 1234, None),
    ("<nil>", FORGED, 1234, None),                                                 # the comment is not touched
    (FORGED, "plain", 0, None),                                                    # root may
])
def test_modify_refuses_users_writing_or_changing_a_vm_request(forge, new, cur, uid, refused):
    rc, msg = forge("modify", new, cur, uid)
    if refused is None:
        assert (rc, msg) == (0, "")
    else:
        assert rc == -1 and msg.startswith("vmwrap: " + refused), msg


def test_render_into_a_missing_directory_says_which(tmp_path):
    """`config render slurm --lua-out /no/such/dir/x.lua` ended in a FileNotFoundError traceback."""
    from vmwrap.config import Settings
    from vmwrap.errors import UserError
    from vmwrap_plugins.slurm.render import render_config

    with pytest.raises(UserError, match=r"cannot write the Lua filter to .*/absent/job_submit.lua: directory "
                                        r".*/absent does not exist"):
        (tmp_path / "images.toml").write_text("")
        render_config(Settings(catalog=str(tmp_path / "images.toml")), lua_out=str(tmp_path / "absent" / "job_submit.lua"))
    assert not (tmp_path / "absent").exists()


def _rendered_conf(tmp_path, **site) -> list[str]:
    """slurm.conf's lines from `vmwrap config render slurm` (the CLI loads the site config)."""
    from click.testing import CliRunner

    from vmwrap.cli import main
    from vmwrap.config import render

    (tmp_path / "images.toml").write_text("")
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(render({"catalog": str(tmp_path / "images.toml"), **site}))
    r = CliRunner().invoke(main, ["--config", str(cfg), "config", "render", "slurm",
                                  "--lua-out", str(tmp_path / "job_submit.lua")])
    assert r.exit_code == 0, (r.output, r.exception)
    return r.stdout.splitlines()


def test_render_gives_slurm_the_prolog_timeout_vmwrap_keeps_to(tmp_path):
    """The prolog stops its own work before prolog_timeout_s: Slurm's limit must be that one."""
    lines = _rendered_conf(tmp_path, prolog_timeout_s=120.5)
    assert [ln for ln in lines if "PrologEpilogTimeout" in ln or "prolog_timeout_s" in ln] == [
        "PrologEpilogTimeout=121"], lines


def test_render_without_a_prolog_timeout_says_to_set_one(tmp_path):
    """With none in the site config Slurm gets 300 s, and the admin is told to give vmwrap the same."""
    lines = _rendered_conf(tmp_path)
    i = lines.index("PrologEpilogTimeout=300")
    assert lines[i - 1] == ("# Set prolog_timeout_s = 300 in vmwrap's config too, so that its prolog stops "
                            "before Slurm kills it."), lines


def test_modify_lets_a_vm_job_grow_to_several_nodes(forge):
    """`scontrol update job=ID NumNodes=2` of a pending VM job: it gets a VM on each node, as at submit."""
    for uid in (1234, 0):
        assert forge("modify", "<nil>", FORGED, uid, 2) == (0, "")
    assert forge("modify", "<nil>", FORGED, 1234, 1) == (0, "")
    assert forge("modify", "<nil>", "plain", 1234, 2) == (0, "")
    assert forge("modify", "<nil>", "<nil>", 1234, 2) == (0, "")


def test_render_runs_sallocs_interactive_step_through_vmwrap(tmp_path):
    """`salloc --container=IMAGE`: Slurm's interactive step is `vmwrap slurm interactive`, with the
    vmwrap and node config the batch steps use."""
    lines = _rendered_conf(tmp_path)
    assert "LaunchParameters=use_interactive_step" in lines
    assert ('InteractiveStepOptions="--interactive --preserve-env --pty /usr/local/bin/vmwrap slurm interactive"'
            in lines), lines
    from vmwrap.config import Settings
    from vmwrap_plugins.slurm.render import render_config

    (tmp_path / "empty.toml").write_text("")
    conf = render_config(Settings(catalog=str(tmp_path / "empty.toml")), lua_out=str(tmp_path / "j.lua"),
                         vmwrap_path="/opt/v/bin/vmwrap", node_config="/etc/vmwrap/%n.toml")
    assert ('InteractiveStepOptions="--interactive --preserve-env --pty /opt/v/bin/vmwrap --config '
            '/etc/vmwrap/%n.toml slurm interactive"') in conf.splitlines()
