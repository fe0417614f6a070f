"""Every job start runs `vmwrap` (the prolog, the batch step): it imports what the command it runs
needs, not every area's and plugin's module (~40 ms a start when it did)."""

import subprocess
import sys
from importlib.metadata import entry_points

from vmwrap import adapter
from vmwrap.adapter import CLI_GROUP, GROUP
from vmwrap.cli import COMMANDS, main


def test_a_hook_command_loads_only_its_own_modules():
    code = ("import sys\nfrom vmwrap.cli import main\n"
            "try:\n    main(['slurm', 'prolog', '--help'], prog_name='vmwrap')\nexcept SystemExit:\n    pass\n"
            "import vmwrap.lifecycle, vmwrap_plugins.slurm.hooks  # what the prolog itself runs (a cached image)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('vmwrap', 'http', 'ssl', 'jinja2')))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    loaded = set(r.stdout.split("\n")[-2].split())
    assert "vmwrap_plugins.slurm.cli" in loaded, r.stdout + r.stderr
    for heavy in ("vmwrap.cli.images", "vmwrap.cli.checkpoints", "vmwrap.cli.simulate", "vmwrap.sim",
                  "vmwrap.transport", "http.client", "ssl", "vmwrap_plugins.sge.cli", "vmwrap_plugins.htcondor.cli"):
        assert heavy not in loaded, (heavy, sorted(loaded))


def test_every_command_is_found_by_its_name():
    """A command loads by the name it is listed under: a plugin's entry point must carry its command's name."""
    names = main.list_commands(None)
    assert set(COMMANDS) <= set(names)
    for ep in entry_points(group=CLI_GROUP):
        assert ep.name in names
    for name in names:
        cmd = main.get_command(None, name)
        assert cmd is not None and cmd.name == name, (name, cmd)
    assert main.get_command(None, "no-such-command") is None


def test_the_job_start_path_imports_neither_package_metadata_nor_templates():
    """The prolog finds its plugin and the batch step runs the payload without importlib.metadata
    (vmwrap's own entry points are read from its dist-info) or jinja2 (the payload renders no XML):
    17-20 ms less per hook command, measured side by side (docs/design.md)."""
    code = ("import sys\nfrom vmwrap.cli import main\n"
            "for argv in (['slurm', 'prolog', '--help'], ['slurm', 'attach', '--help']):\n"
            "    try:\n        main(argv, prog_name='vmwrap')\n    except SystemExit:\n        pass\n"
            "from vmwrap import adapter, payload\nassert adapter.scheduler('slurm').name == 'slurm'\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('importlib.metadata', 'jinja2')))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == "", r.stdout


def test_vmwraps_own_entry_points_read_directly_are_what_importlib_metadata_reads():
    eps = [ep for g in (GROUP, CLI_GROUP) for ep in entry_points(group=g) if ep.dist.name == "vmwrap"]
    assert {ep.name for ep in eps} >= {"slurm", "sge", "torque", "condor", "pbs"}
    for ep in eps:
        assert adapter._own_entry_point(ep.group, ep.name) == ep.value, ep
        assert adapter._load(ep.group, ep.name) is ep.load()
    assert adapter._own_entry_point(CLI_GROUP, "no-such-command") is None
    assert adapter.cli_group("no-such-command") is None
