"""`python -m vmwrap_plugins.htcondor ...` = `vmwrap ...` with the condor commands present even where
the installed entry points predate this plugin (the bridge starts the payload side this way)."""

from vmwrap.cli import main

from .cli import condor

if "condor" not in main.commands:
    main.add_command(condor)
main(prog_name="vmwrap")
