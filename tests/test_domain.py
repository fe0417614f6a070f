"""Domain XML and lifecycle logic; libvirt's test driver for speed, real guests live in test_vm.py."""

import xml.etree.ElementTree as ET

from vmwrap import domain


def spec(**kw):
    base = dict(name="vmwrap-1", job_id="1", virt_type="qemu", memory_mib=256, cpus=2,
                kernel="/k", initrd="/i", run_dir="/run/x", disk="/d.qcow2", ctl_dir="/c", work_dir="/w")
    base.update(kw)
    return domain.Spec(**base)


def test_xml_is_escaped_and_well_formed():
    evil = "/home/u/it's <a> & \"b\""
    root = ET.fromstring(domain.render(spec(work_dir=evil, cmdline="x='<y>'")))
    shares = {f.find("target").get("dir"): f.find("source").get("dir") for f in root.iter("filesystem")}
    assert shares["vmwrap_work"] == evil
    assert root.find("os/cmdline").text.endswith("x='<y>'")


def test_resources_and_type():
    root = ET.fromstring(domain.render(spec(virt_type="kvm", cpus=3, memory_mib=1024)))
    assert root.get("type") == "kvm"
    assert root.find("vcpu").text == "3" and root.find("memory").text == "1024"
    assert root.find("features/acpi") is not None  # without ACPI a 'pc' guest cannot power off
    ctl = [f for f in root.iter("filesystem") if f.find("target").get("dir") == "vmwrap_ctl"][0]
    assert ctl.find("readonly") is not None


def test_a_nat_network_is_a_user_mode_virtio_card_with_a_stable_mac_and_none_has_no_card():
    assert ET.fromstring(domain.render(spec())).find("devices/interface") is None
    root = ET.fromstring(domain.render(spec(network="nat")))
    (card,) = root.findall("devices/interface")
    assert card.get("type") == "user" and card.find("model").get("type") == "virtio"
    mac = card.find("mac").get("address")
    assert mac.startswith("52:54:00:") and mac == spec(network="nat").mac != spec(name="vmwrap-2").mac
    assert [c.tag for c in card] == ["mac", "model"]  # no port forwarded in, no guestfwd


def test_libvirt_reads_the_guest_cpu_back_in_two_monitor_calls_not_one_per_feature():
    # libvirt 9 with this capability asks QEMU for each of ~400 CPU features separately: 0.3 s of
    # every start and restore under TCG (benchmarks/start.py, benchmarks/checkpoint.py)
    root = ET.fromstring(domain.render(spec()))
    ns = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    dropped = [c.get("capability") for c in root.findall(f"{ns}capabilities/{ns}del")]
    assert dropped == ["cpu-unavailable-features"]
    assert root.find(f"{ns}commandline") is None and root.find(f"{ns}capabilities/{ns}add") is None


def test_destroy_is_idempotent_on_test_driver():
    conn = domain.connect("test:///default")
    xml = domain.render(spec(name="vmwrap-t1", disk=None, ctl_dir=None, work_dir=None)).replace("type='qemu'", "type='test'", 1)
    conn.createXML(xml, 0)
    assert not domain.is_gone(conn, "vmwrap-t1")
    assert domain.destroy(conn, "vmwrap-t1") is True
    assert domain.is_gone(conn, "vmwrap-t1")
    assert domain.destroy(conn, "vmwrap-t1") is False
