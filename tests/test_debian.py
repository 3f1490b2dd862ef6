"""ksmbench.sources.debian: version order, index parsing, kernel/source resolution, fetching.

Resolution runs against fake package lists (no network); fetching runs against
a local file:// "mirror" holding .deb files built here with dpkg-deb.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ksmbench.sources import debian as d
from ksmbench.errors import KernelNotFound

IMAGE = d.Catalogue.load().kernel_image_pattern
SOURCE = d.Catalogue.load().source_pattern


@pytest.mark.parametrize("older,newer", [
    ("6.1.170-3", "6.1.176-1"),
    ("6.12.95-1~bpo12+1", "6.12.95-1"),        # a backport sorts before the release
    ("7.3~rc7-1~exp1", "7.3-1"),               # an rc sorts before the release
    ("7.3~rc7-1~exp1", "7.3.4-1~bpo13+1"),
    ("6.9.10-1", "6.10.1-1"),                  # numeric, not lexical
    ("9.0-1", "1:1.0-1"),                      # the epoch wins
    ("1.0a-1", "1.0b-1"),
    ("1.0-1", "1.0+b1-1"),
])
def test_compare_versions_orders_like_dpkg(older, newer):
    assert d.compare_versions(older, newer) < 0
    assert d.compare_versions(newer, older) > 0
    assert d.compare_versions(older, older) == 0


def test_compare_versions_agrees_with_dpkg_itself():
    if shutil.which("dpkg") is None:
        pytest.skip("no dpkg")
    versions = ["6.1.176-1", "6.1.170-3", "6.12.95-1~bpo12+1", "6.12.117-1", "7.3~rc7-1~exp1",
                "7.3.4-1~bpo13+1", "7.2.13-1", "1:0.1-1", "6.12.117-1+b1", "6.12.117a-1"]
    for a in versions:
        for b in versions:
            ours = d.compare_versions(a, b)
            theirs = subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0
            assert (ours < 0) == theirs, (a, b)


def test_series_of():
    assert d.series_of("6.12.57-1") == "6.12"
    assert d.series_of("7.3~rc7-1~exp1") == "7.3"
    assert d.series_of("6.1.0") == "6.1"
    assert d.series_of("garbage") is None


def _pkg(name, version, suite, depends=()):
    return d.DebPackage(name, version, suite, f"pool/main/l/linux/{name}_{version}_amd64.deb",
                        1000, "0" * 64, tuple(depends))


FAKE_INDEX = [
    _pkg("linux-image-6.1.0-47-amd64-unsigned", "6.1.170-3", "bookworm"),
    _pkg("linux-image-6.1.0-50-amd64-unsigned", "6.1.176-1", "bookworm"),
    _pkg("linux-image-6.1.0-50-amd64", "6.1.176-1", "bookworm"),            # signed twin
    _pkg("linux-image-6.1.0-50-cloud-amd64-unsigned", "6.1.176-1", "bookworm"),
    _pkg("linux-image-6.1.0-51-rt-amd64-unsigned", "6.1.180-1", "bookworm"),
    _pkg("linux-image-6.12.95+deb12-amd64-unsigned", "6.12.95-1~bpo12+1", "bookworm-backports"),
    _pkg("linux-image-6.12.117+deb13-amd64-unsigned", "6.12.117-1", "trixie"),
    _pkg("linux-image-6.12.117+deb13-amd64-dbg", "6.12.117-1", "trixie"),
    _pkg("linux-image-7.2.13+deb14-amd64", "7.2.13-1", "sid",
         ["linux-base-7.2.13+deb14-amd64", "linux-binary-7.2.13+deb14-amd64",
          "linux-modules-7.2.13+deb14-amd64"]),
    _pkg("linux-image-7.3+deb14-amd64", "7.3~rc7-1~exp1", "experimental"),
    _pkg("linux-source-6.1", "6.1.176-1", "bookworm"),
    _pkg("linux-source-6.12", "6.12.95-1~bpo12+1", "bookworm-backports"),
    _pkg("linux-source-6.12", "6.12.117-1", "trixie"),
    _pkg("linux-source-7.2", "7.2.13-1", "sid"),
]


def test_select_kernel_newest_generic_unsigned_across_suites():
    assert d.select_kernel(FAKE_INDEX, "6.1", IMAGE).name == "linux-image-6.1.0-50-amd64-unsigned"
    got = d.select_kernel(FAKE_INDEX, "6.12", IMAGE)
    assert (got.name, got.suite) == ("linux-image-6.12.117+deb13-amd64-unsigned", "trixie")
    assert d.select_kernel(FAKE_INDEX, "7.2", IMAGE).name == "linux-image-7.2.13+deb14-amd64"
    assert d.select_kernel(FAKE_INDEX, "7.3", IMAGE).suite == "experimental"
    assert d.select_kernel(FAKE_INDEX, "5.10", IMAGE) is None


def test_select_kernel_skips_incomplete_packages():
    incomplete = {"linux-image-6.1.0-50-amd64-unsigned", "linux-image-6.1.0-50-amd64"}
    got = d.select_kernel(FAKE_INDEX, "6.1", IMAGE, complete=lambda p: p.name not in incomplete)
    assert got.version == "6.1.170-3"


def test_kernel_series_lists_each_series_once():
    series = d.kernel_series(FAKE_INDEX, IMAGE)
    assert list(series) == ["6.1", "6.12", "7.2", "7.3"]
    assert series["6.12"].version == "6.12.117-1"


def test_select_source_closest_series():
    assert d.select_source(FAKE_INDEX, "6.12", SOURCE).version == "6.12.117-1"
    assert d.select_source(FAKE_INDEX, "6.1", SOURCE).name == "linux-source-6.1"
    assert d.select_source(FAKE_INDEX, "6.10", SOURCE).name == "linux-source-6.12"
    assert d.select_source(FAKE_INDEX, "6.2", SOURCE).name == "linux-source-6.1"
    assert d.select_source(FAKE_INDEX, "7.1", SOURCE).name == "linux-source-7.2"
    assert d.select_source([], "6.1", SOURCE) is None


def test_parse_packages_reads_wanted_stanzas_only():
    text = (
        "Package: linux-image-6.12.117+deb13-amd64-unsigned\nSource: linux\n"
        "Version: 6.12.117-1\nDepends: kmod, linux-base (>= 4.3~) | foo\n"
        "Description: Linux\n multi-line\nFilename: pool/main/l/linux/x.deb\n"
        "Size: 123\nSHA256: " + "ab" * 32 + "\n\n"
        "Package: vim\nVersion: 9\nFilename: pool/v.deb\nSize: 1\nSHA256: 00\n\n"
        "Package: linux-source-6.12\nVersion: 6.12.117-1\nFilename: pool/s.deb\nSize: 9\n\n"
    )
    import re

    got = d.parse_packages(text, "trixie", re.compile(f"(?:{IMAGE})|(?:{SOURCE})"))
    # the source stanza lacks SHA256: it cannot be fetched safely, so it is dropped
    assert [p.name for p in got] == ["linux-image-6.12.117+deb13-amd64-unsigned"]
    p = got[0]
    assert (p.version, p.size, p.suite, p.depends) == ("6.12.117-1", 123, "trixie",
                                                       ("kmod", "linux-base", "foo"))


def test_bad_series_is_refused(tmp_path):
    archive = d.DebianArchive(tmp_path)
    with pytest.raises(KernelNotFound, match="not a kernel series"):
        archive.resolve_kernel("six")


# -- fetching from a local mirror ---------------------------------------------------------

def _build_deb(tmp: Path, name: str, version: str, files: dict[str, bytes], mirror: Path) -> d.DebPackage:
    root = tmp / f"pkg-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
        "Maintainer: t <t@example.invalid>\nDescription: test\n")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    rel = f"pool/{name}_{version}_amd64.deb"
    (mirror / "pool").mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(mirror / rel)],
                   check=True, capture_output=True)
    data = (mirror / rel).read_bytes()
    return d.DebPackage(name, version, "sid", rel, len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture
def local_archive(tmp_path):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("no dpkg-deb")
    mirror = tmp_path / "mirror"
    base = d.Catalogue.load()
    catalogue = d.Catalogue(**{**base.__dict__, "mirror": mirror.as_uri()})
    archive = d.DebianArchive(tmp_path / "cache", catalogue=catalogue)
    (archive.apt_dir).mkdir(parents=True)
    (archive.apt_dir / "updated").touch()  # fresh lists: no apt-get update
    return archive, mirror, tmp_path


def test_fetch_kernel_unpacks_image_and_modules(local_archive):
    archive, mirror, tmp = local_archive
    pkg = _build_deb(tmp, "linux-image-9.9.1+deb99-amd64-unsigned", "9.9.1-1", {
        "boot/vmlinuz-9.9.1+deb99-amd64": b"kernel",
        "usr/lib/modules/9.9.1+deb99-amd64/kernel/fs/9p/9p.ko": b"module",
    }, mirror)
    archive._index = [pkg]
    assert archive.resolve_kernel("9.9") == pkg
    fetched = archive.fetch_kernel(pkg)
    assert fetched.release == "9.9.1+deb99-amd64"
    assert fetched.vmlinuz.read_bytes() == b"kernel"
    # trixie-style usr/lib/modules gets a lib -> usr/lib link (virtme-ng looks in lib/modules)
    assert (fetched.root / "lib").is_symlink()
    assert (fetched.modules_dir / "kernel/fs/9p/9p.ko").read_bytes() == b"module"
    # cached: a second fetch does not download again
    (mirror / pkg.filename).unlink()
    assert archive.fetch_kernel(pkg).vmlinuz == fetched.vmlinuz


def test_fetch_kernel_split_packaging(local_archive):
    """Debian 6.19+: the image package only depends on linux-binary-* and linux-modules-*."""
    archive, mirror, tmp = local_archive
    rel = "9.10.2+deb99-amd64"
    binary = _build_deb(tmp, f"linux-binary-{rel}", "9.10.2-1",
                        {f"usr/lib/modules/{rel}/vmlinuz": b"kernel"}, mirror)
    modules = _build_deb(tmp, f"linux-modules-{rel}", "9.10.2-1",
                         {f"usr/lib/modules/{rel}/kernel/net/9p/9pnet.ko": b"m"}, mirror)
    image = _build_deb(tmp, f"linux-image-{rel}", "9.10.2-1", {"usr/share/doc/x": b""}, mirror)
    image = d.DebPackage(**{**image.__dict__, "depends": (f"linux-base-{rel}", binary.name,
                                                          modules.name)})
    archive._index = [image, binary, modules]
    assert archive.resolve_kernel("9.10") == image
    fetched = archive.fetch_kernel(image)
    assert fetched.release == rel
    assert fetched.vmlinuz.read_bytes() == b"kernel"
    assert (fetched.modules_dir / "kernel/net/9p/9pnet.ko").exists()
    # a modules package missing from the lists makes the kernel unresolvable, not half-fetched
    archive._index = [image, binary]
    with pytest.raises(KernelNotFound):
        archive.resolve_kernel("9.10")


def test_download_refuses_a_wrong_checksum(local_archive):
    archive, mirror, tmp = local_archive
    pkg = _build_deb(tmp, "linux-image-9.9.2-1-amd64-unsigned", "9.9.2-1",
                     {"boot/vmlinuz-9.9.2-1-amd64": b"k"}, mirror)
    bad = d.DebPackage(**{**pkg.__dict__, "sha256": "0" * 64})
    with pytest.raises(d.ArchiveError, match="SHA256"):
        archive.download(bad)
    assert not list((archive.cache / "debs").glob("*.deb"))


def test_fetch_source_extracts_only_members(local_archive):
    archive, mirror, tmp = local_archive
    top = "linux-source-9.9"
    tree = tmp / "src" / top
    for rel in ("tools/mm/page-types.c", "tools/testing/selftests/mm/ksm_tests.c", "mm/ksm.c"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(rel)
    tarball = tmp / f"{top}.tar.xz"
    subprocess.run(["tar", "-cJf", str(tarball), "-C", str(tmp / "src"), top], check=True)
    pkg = _build_deb(tmp, top, "9.9.1-1", {f"usr/src/{top}.tar.xz": tarball.read_bytes()}, mirror)
    archive._index = [pkg]
    got = archive.fetch_source("9.9", members=["tools/mm", "tools/testing/selftests/mm"])
    assert (got / "tools/mm/page-types.c").read_text() == "tools/mm/page-types.c"
    assert (got / "tools/testing/selftests/mm/ksm_tests.c").exists()
    assert not (got / "mm/ksm.c").exists()
    # asking for more extracts more; asking again for the same does nothing
    got = archive.fetch_source("9.9", members=["mm"])
    assert (got / "mm/ksm.c").exists()
