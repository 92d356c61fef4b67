"""MLproject entry point ``experts`` (see ``kdd experts --help``)."""

from entrypoints import run_stage

if __name__ == "__main__":
    run_stage("experts")
