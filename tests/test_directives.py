import pytest

from vmwrap import directives
from vmwrap.errors import UserError


def parse(body: str):
    return directives.parse("#!/bin/sh\n" + body)


def test_reads_image_memory_cpus():
    r = parse("#SBATCH -n 1\n#VMWRAP --image=deb12 --memory=2G\n#VMWRAP --cpus 2\necho hi\n")
    assert (r.image, r.memory_mib, r.cpus) == ("deb12", 2048, 2)


def test_only_leading_comment_block():
    r = parse("echo start\n#VMWRAP --image=late\n")
    assert r.image is None


def test_blank_lines_and_comments_before_directive():
    assert parse("\n# comment\n\n#VMWRAP --image=a.b-c_1\n").image == "a.b-c_1"


def test_no_directive():
    assert parse("echo hi\n") == directives.Request()


def test_a_huge_bad_image_name_is_shown_cut_short():
    with pytest.raises(UserError) as e:
        directives.check_image_name("x/" * 2500)
    assert "(5000 characters)" in str(e.value) and len(str(e.value)) < 250, str(e.value)


def test_similar_prefix_is_not_a_directive():
    assert parse("#VMWRAPPER --image=x\n").image is None


@pytest.mark.parametrize("line, message", [
    ("#VMWRAP --image=../x", "invalid image name '../x'"),
    ("#VMWRAP --image=a/b", "invalid image name 'a/b'"),
    ('#VMWRAP --image="deb"', "invalid image name '\"deb\"'"),
    ("#VMWRAP --image='deb'", "invalid image name \"'deb'\""),
    ("#VMWRAP --image=<x>", "invalid image name '<x>'"),
    ("#VMWRAP --image=a&b", "invalid image name 'a&b'"),
    ("#VMWRAP --image=a b", "line 2: unexpected 'b'"),
    ("#VMWRAP --image=", "--image needs a value"),
    ("#VMWRAP --image", "--image needs a value"),
    ("#VMWRAP", "empty #VMWRAP directive"),
    ("#VMWRAP image=x", "unexpected 'image=x'"),
    ("#VMWRAP --imgae=x", "unknown directive --imgae"),
    ("#VMWRAP --image=a --image=b", "duplicate directive --image"),
    ("#VMWRAP --memory=0", "at least 1M"),
    ("#VMWRAP --memory=127M", "at least 128M to boot"),
    ("#VMWRAP --memory=-5G", "memory must be positive"),
    ("#VMWRAP --memory=lots", "not a size"),
    ("#VMWRAP --memory=99999999999T", "absurdly large"),
    ("#VMWRAP --cpus=0", "must be at least 1"),
    ("#VMWRAP --cpus=-2", "must be at least 1"),
    ("#VMWRAP --cpus=two", "not a whole number"),
    ("#VMWRAP --cpus=1.5", "not a whole number"),
    ("#VMWRAP --cpus=100000", "absurdly large"),
    ("#VMWRAP --on-lost-checkpoint=maybe", "use 'restart' or 'fail'"),
])
def test_bad_directives_have_specific_messages(line, message):
    with pytest.raises(UserError) as e:
        parse(line + "\n")
    assert message in str(e.value)
    assert "line 2" in str(e.value)


def test_duplicate_across_lines():
    with pytest.raises(UserError, match="line 3: duplicate directive --cpus"):
        parse("#VMWRAP --cpus=1\n#VMWRAP --cpus=2\n")


def test_newline_in_name_via_api():
    with pytest.raises(UserError, match="invalid image name"):
        directives.check_image_name("deb\n12")


@pytest.mark.parametrize("value, mib", [("512", 512), ("512M", 512), ("2G", 2048), ("2GiB", 2048),
                                        ("1T", 1024 * 1024), ("262144K", 256), ("1g", 1024)])
def test_memory_units(value, mib):
    assert directives.parse_memory(value) == mib
