"""MLproject entry point ``teacher`` (see ``kdd teacher --help``)."""

from entrypoints import run_stage

if __name__ == "__main__":
    run_stage("teacher")
