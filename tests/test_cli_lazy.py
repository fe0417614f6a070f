"""Every job start runs `vmwrap` (the prolog, the batch step): it imports what the command it runs
needs, not every area's and plugin's module (~40 ms a start when it did)."""

import subprocess
import sys
from importlib.metadata import entry_points

from vmwrap.adapter import CLI_GROUP
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
