import pytest

from vmwrap.catalog import Artifact, Catalog, Image, register
from vmwrap.errors import NodeError, UserError

SHA = "a" * 64


def entry(name, **kw):
    art = Artifact("/x", SHA, 10)
    return Image(name=name, boot="kernel", kernel=art, initrd=art, **kw)


def test_roundtrip_and_replace(tmp_path):
    p = tmp_path / "images.toml"
    register(str(p), entry("one", description='quote " and \\ back'))
    register(str(p), entry("two", users=["alice"], memory_mib=512))
    register(str(p), entry("one", description="replaced"))
    cat = Catalog.load(str(p))
    assert sorted(cat.images) == ["one", "two"]
    assert cat.images["one"].description == "replaced"
    assert cat.images["two"].memory_mib == 512


def test_unknown_image_lists_offer(tmp_path):
    cat = Catalog({"deb12": entry("deb12")})
    with pytest.raises(UserError, match=r"unknown image 'nope' \(this site offers: deb12\)"):
        cat.resolve("nope", "root")


def test_access_by_user_and_group():
    cat = Catalog({"priv": entry("priv", users=["alice"]), "grp": entry("grp", groups=["root"]),
                   "open": entry("open")})
    assert cat.resolve("open", "root").name == "open"
    assert cat.resolve("grp", "root").name == "grp"
    with pytest.raises(UserError, match="user 'root' may not use image 'priv'"):
        cat.resolve("priv", "root")
    with pytest.raises(UserError, match="may not use image 'grp'"):
        cat.resolve("grp", "nobody")


def test_resolve_validates_name_first():
    with pytest.raises(UserError, match="invalid image name"):
        Catalog({}).resolve("../../etc/passwd", "root")


@pytest.mark.parametrize("text, message", [
    ("[images.x]\nboot='kernel'\n", "needs a [kernel] table"),
    ("[images.x]\nboot='floppy'\n", "boot='floppy' is not supported"),
    ("[images.x]\nkernel={source='/a', sha256='zz', size=1}\ninitrd={source='/a', sha256='zz', size=1}\n",
     "sha256 is not 64 hex digits"),
    ("[images.x]\nkernel={source='/a', size=1}\ninitrd={source='/a', size=1}\n", "lacks sha256"),
    ("this is not toml", "unreadable"),
])
def test_bad_catalog_is_a_node_error(tmp_path, text, message):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(NodeError) as e:
        Catalog.load(str(p))
    assert message in str(e.value)


def test_missing_catalog(tmp_path):
    with pytest.raises(NodeError, match="does not exist"):
        Catalog.load(str(tmp_path / "none.toml"))


def test_an_unknown_image_error_names_only_open_images():
    """Every user saw the names of every restricted image in the "unknown image" error and in the
    submit filters rendered from the catalog (Lua, HTCondor); a restricted image is for its users only."""
    from vmwrap_plugins.slurm.render import render_lua

    cat = Catalog({"open": entry("open"), "secret-proj": entry("secret-proj", users=["alice"]),
                   "grp-only": entry("grp-only", groups=["staff"])})
    assert cat.offered() == ["open"]
    with pytest.raises(UserError) as e:
        cat.resolve("nope", "bob")
    assert "this site offers: open)" in str(e.value) and "secret" not in str(e.value)
    assert "secret-proj" not in render_lua(cat).split("local OFFER", 1)[1].split("\n", 1)[0]
