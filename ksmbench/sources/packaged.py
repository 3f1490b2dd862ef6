"""Data files shipped inside the ksmbench package (``[tool.setuptools.package-data]``).

They are found through :mod:`importlib.resources`, so the same code works from
a source checkout, an editable install and a regular ``pip install .`` (where
no repository exists next to the package).  Callers get a path on disk because
the files are handed to other programs: the guest's shell runs the launcher,
the kernel's ``merge_config.sh`` reads the config fragment.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged_file(package: str, name: str) -> Path:
    """The file ``name`` shipped in ``package`` (e.g. ``"ksmbench.sources"``).

    Always a path on disk: ksmbench is installed unzipped (setuptools' default
    for a wheel), so the resource is a file in the package's directory.  Whether
    it exists is for the reader to report, naming the file.
    """
    return Path(str(resources.files(package).joinpath(name)))
