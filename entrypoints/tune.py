"""MLproject entry point ``tune`` (see ``kdd tune --help``)."""

from entrypoints import run_stage

if __name__ == "__main__":
    run_stage("tune")
