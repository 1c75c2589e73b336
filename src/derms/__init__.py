"""derms: an open-source Distributed Energy Resource Management System."""

__version__ = "0.1.0"
