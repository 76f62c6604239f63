"""The version of pyro_structsel (one place; setup.cfg reads it from here)."""

VERSION = "0.1.0"
