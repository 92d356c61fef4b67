"""MLproject entry point ``combined`` (see ``kdd combined --help``)."""

from entrypoints import run_stage

if __name__ == "__main__":
    run_stage("combined")
