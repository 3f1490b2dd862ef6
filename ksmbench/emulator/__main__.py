"""``python -m ksmbench.emulator [PROFILE...]``: the behaviour flags and the profiles."""

from .profiles import main

raise SystemExit(main())
