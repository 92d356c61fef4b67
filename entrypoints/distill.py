"""MLproject entry point ``distill`` (see ``kdd distill --help``)."""

from entrypoints import run_stage

if __name__ == "__main__":
    run_stage("distill")
