"""``ksmbench kernels``: what can be booted, cached and fetchable, with versions.

Fetchable: every kernel series Debian's archive has today in the suites of
``ksmbench/sources/catalogue.toml``, with the package ``debian:<series>`` resolves to.
Cached: unpacked kernel packages and prepared own images in the cache.
Also shows the accelerator verdict for this host (the KVM probe, if it ran).
"""

from __future__ import annotations

import argparse
import json

from ...errors import KsmbenchError


def kernels_command(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ...console import esc, make_console
    from ...sources.cache import cache_root
    from ...sources.debian import DebianArchive
    from .accel import host_key, kvm_device_usable, read_verdicts

    console = make_console()
    archive = DebianArchive(console=make_console(stderr=True))
    cached_dirs = {p.name: p for p in archive.cached_kernels()}
    archive.update()
    series = archive.kernel_series()

    table = Table(title="Debian kernels (--kernel debian:<series>)")
    for col in ("kernel", "package", "version", "suite", "cached"):
        table.add_column(col)
    listed: set[str] = set()
    for name, pkg in series.items():
        dir_name = archive.kernel_dir(pkg).name
        listed.add(dir_name)
        size = sum(p.size for p in archive.kernel_parts(pkg))
        cached = "yes" if dir_name in cached_dirs else f"no ({size / 1e6:.0f} MB to fetch)"
        table.add_row(*(esc(c) for c in (f"debian:{name}", pkg.name, pkg.version, pkg.suite, cached)))
    console.print(table)

    older = [p for name, p in cached_dirs.items() if name not in listed]
    images = sorted((cache_root() / "images").glob("*/.complete")) \
        if (cache_root() / "images").is_dir() else []
    if older or images:
        extra = Table(title="also in the cache (not what debian:<series> resolves to today)")
        extra.add_column("what")
        extra.add_column("path")
        for p in older:
            try:
                meta = json.loads((p / ".complete").read_text())
                what = f"{meta['name']} {meta['version']} ({meta['suite']})"
            except (OSError, ValueError, KeyError):
                what = p.name
            extra.add_row(esc(what), esc(p))
        for stamp in images:
            boot = sorted((stamp.parent / "boot").glob("*"))
            extra.add_row("own image (--kernel PATH)", esc(boot[0] if boot else stamp.parent))
        console.print(extra)

    console.print("own kernels: --kernel PATH/TO/bzImage [--modules DIR]; "
                  "build one with vm/build-kernel SRC [--patches DIR] -o OUT")
    try:
        key = host_key()
    except KsmbenchError as exc:
        console.print(f"accelerator: unknown ({esc(exc.one_line())})")
        return 0
    verdict = read_verdicts().get(key)
    if not kvm_device_usable():
        console.print("accelerator: tcg (no usable /dev/kvm)")
    elif verdict is None:
        console.print("accelerator: not probed yet on this host (the first VM run probes KVM, 30 s at most)")
    else:
        accel = "kvm" if verdict.get("kvm_works") else "tcg"
        console.print(f"accelerator: {accel} (KVM probe of {verdict.get('checked_at')}: "
                      f"{esc(verdict.get('detail'))})")
    console.print(f"cache: {esc(cache_root())} (KSMBENCH_CACHE)")
    return 0
