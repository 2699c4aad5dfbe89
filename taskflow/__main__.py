"""``python -m taskflow run``: the command line without installing the project
(a buildpack installs only its dependencies, from the lock)."""

from .cli import main

main()
