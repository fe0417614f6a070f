"""`python -m vmwrap_plugins.pbs ...` = `vmwrap ...` with the pbs commands present even where the
installed entry points predate this plugin: the hook scripts (vmwrap/hooks/pbs-*) call this."""

from vmwrap.cli import main

from .cli import pbs

if "pbs" not in main.commands:
    main.add_command(pbs)
main(prog_name="vmwrap")
