"""VM backend pieces that need no VM: accelerator decision, kernel specs, guard, build helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ksmbench.backends.vm import accel, boot, build, kernels
from ksmbench.errors import KernelNotFound, UsageError, VMError


# -- accelerator decision -------------------------------------------------------------

class CountingProbe:
    def __init__(self, works: bool, detail: str = "probe"):
        self.calls = 0
        self.works = works
        self.detail = detail

    def __call__(self):
        self.calls += 1
        return accel.ProbeResult(self.works, self.detail, 1.5)


def test_tcg_requested_never_probes(tmp_path):
    probe = CountingProbe(True)
    got = accel.decide("tcg", probe, key="k", cache_file=tmp_path / "a.json", device_usable=True)
    assert got.accelerator == "tcg" and probe.calls == 0


def test_kvm_requested_without_device_is_an_error(tmp_path):
    with pytest.raises(VMError, match="/dev/kvm"):
        accel.decide("kvm", CountingProbe(True), key="k", cache_file=tmp_path / "a.json",
                     device_usable=False)


def test_kvm_requested_with_device_is_used_unprobed(tmp_path):
    probe = CountingProbe(False)
    got = accel.decide("kvm", probe, key="k", cache_file=tmp_path / "a.json", device_usable=True)
    assert got.accelerator == "kvm" and probe.calls == 0


def test_auto_without_device_is_tcg_without_probe(tmp_path):
    probe = CountingProbe(True)
    got = accel.decide("auto", probe, key="k", cache_file=tmp_path / "a.json", device_usable=False)
    assert got.accelerator == "tcg" and probe.calls == 0
    assert not (tmp_path / "a.json").exists()


def test_auto_probes_once_and_caches_the_verdict_per_key(tmp_path):
    cache = tmp_path / "a.json"
    failing = CountingProbe(False, "KVM internal error")
    first = accel.decide("auto", failing, key="hostA", cache_file=cache, device_usable=True)
    assert (first.accelerator, first.probed, failing.calls) == ("tcg", True, 1)
    again = accel.decide("auto", failing, key="hostA", cache_file=cache, device_usable=True)
    assert (again.accelerator, again.probed, failing.calls) == ("tcg", False, 1)
    assert "KVM internal error" in again.reason
    # another host key (new kernel, CPU or QEMU) probes again
    working = CountingProbe(True)
    other = accel.decide("auto", working, key="hostB", cache_file=cache, device_usable=True)
    assert (other.accelerator, working.calls) == ("kvm", 1)
    stored = json.loads(cache.read_text())
    assert stored["hostA"]["kvm_works"] is False and stored["hostB"]["kvm_works"] is True


def test_unknown_accel_value(tmp_path):
    with pytest.raises(UsageError):
        accel.decide("hvf", CountingProbe(True), key="k", cache_file=tmp_path / "a.json",
                     device_usable=True)


def test_host_key_names_kernel_cpu_and_qemu():
    key = accel.host_key(qemu="7.2.22")
    assert os.uname().release in key and "qemu 7.2.22" in key and accel.cpu_model() in key


def test_observed_accelerator_trusts_the_guest_cpu():
    assert boot.observed_accelerator("kvm", {"cpu_model": "QEMU TCG CPU version 2.5+"}) == "tcg"
    assert boot.observed_accelerator("kvm", {"cpu_model": "Intel(R) Xeon(R)"}) == "kvm"
    assert boot.observed_accelerator("tcg", {"cpu_model": "QEMU TCG CPU version 2.5+"}) == "tcg"


# -- kernel specs ---------------------------------------------------------------------

def test_labels():
    assert kernels.label_for("debian:6.12") == "debian:6.12"
    assert kernels.label_for("/x/../y/bzImage") == "/y/bzImage"
    assert kernels.safe_name("debian:6.12") == "debian_6.12"
    assert kernels.safe_name("/home/u/linux/arch/x86/boot/bzImage") == "home_u_linux_arch_x86_boot_bzImage"
    assert len(kernels.safe_name("/a" * 200)) <= 80


@pytest.mark.parametrize("spec,message", [
    ("debian:6", "not a Debian kernel series"),
    ("debian:latest", "not a Debian kernel series"),
    ("/nonexistent/bzImage", "no such file"),
])
def test_bad_specs_are_refused_early(spec, message):
    with pytest.raises(KernelNotFound, match=message):
        kernels.check_spec(spec)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(KernelNotFound, match="is a directory"):
        kernels.check_spec(str(tmp_path))


def _fake_bzimage(path: Path, version: str) -> Path:
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x300 - 0x200).to_bytes(2, "little")
    text = f"{version} (builder@host) #1 SMP".encode() + b"\0"
    data[0x300:0x300 + len(text)] = text
    path.write_bytes(bytes(data))
    return path


def test_image_release_reads_the_boot_header(tmp_path):
    img = _fake_bzimage(tmp_path / "bzImage", "6.12.0-ksmbench")
    assert kernels.image_release(img) == "6.12.0-ksmbench"
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(4096))
    assert kernels.image_release(garbage) is None


def test_garbage_image_is_refused_without_booting(tmp_path):
    garbage = tmp_path / "vmlinuz"
    garbage.write_bytes(os.urandom(8192))
    started = time.monotonic()
    with pytest.raises(KernelNotFound, match="not an x86 boot image"):
        kernels.resolve(str(garbage), cache_dir=tmp_path / "cache")
    assert time.monotonic() - started < 5


def test_own_image_gets_a_boot_root_without_modules(tmp_path):
    img = _fake_bzimage(tmp_path / "bzImage", "6.12.0-own")
    k = kernels.resolve(str(img), cache_dir=tmp_path / "cache")
    assert k.release == "6.12.0-own" and k.label == str(img) and k.modules == 0
    assert k.boot_image.read_bytes() == img.read_bytes()
    assert k.boot_image.parent.name == "boot"


def test_vm_backend_refuses_a_missing_kernel_at_construction():
    from ksmbench.backends import resolve_backend

    with pytest.raises(KernelNotFound):
        resolve_backend("/nonexistent/bzImage")
    with pytest.raises(KernelNotFound):
        resolve_backend("debian:x.y")
    backend = resolve_backend("debian:6.12", memory="1G", cpus=1, accel="tcg", modules=None)
    assert backend.label == "debian:6.12" and backend.tunables_after == {}
    backend.preflight()  # the series exists: no error, and no second package-list read


# -- the guard: no QEMU outlives ksmbench, even when ksmbench is SIGKILLed -------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_guard_kills_the_group_when_its_owner_is_sigkilled(tmp_path):
    # the owner starts a long-lived process group (standing in for vng + QEMU)
    # and its guard, prints the group's pid, and is then SIGKILLed
    owner = textwrap.dedent("""
        import subprocess, sys, time
        from ksmbench.backends.vm.guard import start_guard
        victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
        guard, pipe = start_guard(victim.pid)
        print(victim.pid, guard.pid, flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE, text=True)
    victim, guard = map(int, proc.stdout.readline().split())
    assert _alive(victim)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(victim) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(victim), "the guarded process group outlived its SIGKILLed owner"
    deadline = time.monotonic() + 10
    while _alive(guard) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(guard)


def test_guard_leaves_the_group_alone_while_the_owner_lives():
    from ksmbench.backends.vm.guard import start_guard

    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    guard, pipe = start_guard(victim.pid)
    try:
        time.sleep(0.5)
        assert victim.poll() is None
    finally:
        os.close(pipe)
        guard.wait(timeout=10)
    assert victim.wait(timeout=10) == -signal.SIGKILL


# -- build-kernel helpers ------------------------------------------------------------

def test_patch_order_follows_series_file_else_names(tmp_path):
    for name in ("0002-b.patch", "0001-a.patch", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in build.patch_files(tmp_path)] == ["0001-a.patch", "0002-b.patch"]
    (tmp_path / "series").write_text("# quilt order\n0002-b.patch\n0001-a.patch -p1\n")
    assert [p.name for p in build.patch_files(tmp_path)] == ["0002-b.patch", "0001-a.patch"]
    (tmp_path / "series").write_text("missing.patch\n")
    with pytest.raises(build.BuildError, match="missing.patch"):
        build.patch_files(tmp_path)


def _series(tmp_path: Path) -> Path:
    series = tmp_path / "series-dir"
    series.mkdir()
    (series / "0001-hello.patch").write_text(textwrap.dedent("""\
        From: t <t@example.invalid>
        Subject: [PATCH] say hello

        ---
        --- a/hello.c
        +++ b/hello.c
        @@ -1,2 +1,3 @@
         int main(void)
         {
        +\treturn 0;
        """))
    return series


def test_patches_apply_to_a_plain_tree_once(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.c").write_text("int main(void)\n{\n")
    patches = build.patch_files(_series(tmp_path))
    with open(tmp_path / "log", "w") as log:
        assert build.apply_patches(src, patches, log) == ["patch -p1: 0001-hello.patch"]
        assert "return 0;" in (src / "hello.c").read_text()
        # re-running the build does not fail on an already patched tree
        assert build.apply_patches(src, patches, log) == ["already applied: 0001-hello.patch"]


def test_patches_apply_with_git_am_in_a_git_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.c").write_text("int main(void)\n{\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    for argv in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-qm", "base"]):
        subprocess.run(argv, cwd=src, check=True, env=env)
    patches = build.patch_files(_series(tmp_path))
    os.environ.update({k: v for k, v in env.items() if k.startswith("GIT_")})
    with open(tmp_path / "log", "w") as log:
        assert build.apply_patches(src, patches, log) == ["git am: 0001-hello.patch"]
    subject = subprocess.run(["git", "log", "-1", "--format=%s"], cwd=src, capture_output=True,
                             text=True).stdout.strip()
    assert subject == "say hello"


def test_fragment_checks(tmp_path):
    frag = build.fragment_options(build.FRAGMENT)
    assert frag["CONFIG_KSM"] == "y" and frag["CONFIG_9P_FS"] == "y"
    config = tmp_path / ".config"
    config.write_text("CONFIG_KSM=y\n# CONFIG_9P_FS is not set\n")
    assert build.missing_options(config, {"CONFIG_KSM": "y", "CONFIG_9P_FS": "y"}) == ["CONFIG_9P_FS=y"]


def test_build_refuses_a_non_kernel_tree(tmp_path):
    with pytest.raises(build.BuildError, match="not a kernel source tree"):
        build.build(tmp_path, tmp_path / "out")


def test_unknown_debian_series_is_refused_with_the_available_ones(monkeypatch):
    # the archive's series (what the package lists say), read once per process
    monkeypatch.setattr(kernels, "_available", ["6.1", "6.12", "7.3"])
    with pytest.raises(KernelNotFound) as info:
        kernels.check_spec("debian:9.9")
    line = info.value.one_line()
    assert "debian:9.9" in line and "debian:6.1, debian:6.12, debian:7.3, debian:all" in line
    assert "\n" not in line
    kernels.check_spec("debian:6.12")  # a series the archive has passes


def test_debian_all_expands_to_every_series_once(monkeypatch):
    from ksmbench.backends import expand_kernel_specs

    monkeypatch.setattr(kernels, "_available", ["6.1", "6.12", "7.3"])
    assert expand_kernel_specs(["host", "debian:6.12", "debian:all"]) == \
        ["host", "debian:6.12", "debian:6.1", "debian:7.3"]
    assert expand_kernel_specs(None) == ["host"]


def test_debian_all_without_the_archive_is_one_line(monkeypatch):
    monkeypatch.setattr(kernels, "_available", None)
    monkeypatch.setattr(kernels, "debian_series", lambda: None)
    with pytest.raises(KernelNotFound, match="debian:all: the Debian archive"):
        kernels.expand_specs(["debian:all"])
