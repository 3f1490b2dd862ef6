"""What ksmbench takes from outside the machine, and where it keeps it.

- :mod:`.cache`: the cache root (``$KSMBENCH_CACHE``) every downloaded or built
  thing lives under;
- :mod:`.debian`: Debian's archive through a private apt configuration, and the
  catalogue (``catalogue.toml``, package data) saying which suites and package
  names to look at; kernels and ``linux-source-X.Y`` trees come from it;
- :mod:`.kernel_tools`: the kernel's own C tools built from those trees
  (``page-types``, the KSM selftests), used as peers by both ``bench`` and
  ``selftests`` (which is why they live here, below both, and not in either);
- :mod:`.packaged`: data files shipped inside the package, found the same way
  in a wheel and in a source checkout.
"""
