#!/usr/bin/python3
"""Install vmwrap's wheel into a private venv at /opt/vmwrap/venv under DESTDIR (package build time).

The venv is written by hand (pyvenv.cfg + interpreter symlink) rather than by `python3 -m venv`, which
would record the build directory; it uses Debian's python3-click/-jinja2/-libvirt/-rich through
include-system-site-packages, so nothing is downloaded. Scripts name /opt/vmwrap/venv/bin/python, the
interpreter vmwrap's hooks name. Byte code is left to postinst (and removed by prerm).
Usage: venv-install.py WHEEL DESTDIR
"""

import os
import sys

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile

VENV = "/opt/vmwrap/venv"


def main(wheel: str, destdir: str) -> None:
    pyver = "python%d.%d" % sys.version_info[:2]
    root = destdir + VENV
    os.makedirs(root + "/bin", exist_ok=True)
    os.makedirs(f"{root}/lib/{pyver}/site-packages", exist_ok=True)
    os.symlink("/usr/bin/" + pyver, root + "/bin/python")
    os.symlink("python", root + "/bin/python3")
    os.symlink("lib", root + "/lib64")
    with open(root + "/pyvenv.cfg", "w") as f:
        f.write("home = /usr/bin\ninclude-system-site-packages = true\n"
                "version = %d.%d.%d\n" % sys.version_info[:3])
    site = f"{VENV}/lib/{pyver}/site-packages"
    scheme = {"purelib": site, "platlib": site, "headers": f"{VENV}/include/site/{pyver}/vmwrap",
              "scripts": f"{VENV}/bin", "data": VENV}
    dest = SchemeDictionaryDestination(scheme, interpreter=f"{VENV}/bin/python", script_kind="posix",
                                       bytecode_optimization_levels=(), destdir=destdir)
    with WheelFile.open(wheel) as source:
        install(source, dest, {"INSTALLER": b"dpkg\n"})


if __name__ == "__main__":
    main(*sys.argv[1:])
