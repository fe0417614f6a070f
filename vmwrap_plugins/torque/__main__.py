"""`python -m vmwrap_plugins.torque ...` = `vmwrap ...` with the torque commands present even where the
installed entry points predate this plugin: the hook scripts (vmwrap/hooks/torque-*) call this."""

from vmwrap.cli import main

from .cli import torque

if "torque" not in main.commands:
    main.add_command(torque)
main(prog_name="vmwrap")
