"""`python -I -m vmwrap.cli ...`: how the root hook scripts (vmwrap/hooks/*) and the tests run vmwrap."""

from vmwrap.cli import main

main()
