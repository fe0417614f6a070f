"""HTCondor plugin: vanilla jobs with `+VmwrapImage = "NAME"` run in their own VM (docs/condor.md)."""
