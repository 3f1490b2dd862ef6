"""ksmbench: test and measure Linux KSM, centred on KSM-placed zero pages (6.6+)."""

__version__ = "0.1.0"
