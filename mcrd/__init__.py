"""mcrd: a multicast relay daemon that republishes UDP streams across boundaries."""

__version__ = "0.1.0"
