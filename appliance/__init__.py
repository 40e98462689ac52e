"""aipbx-appliance: turns a Debian host into an aiPBX appliance."""

__version__ = "0.1.0"
