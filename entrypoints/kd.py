"""MLproject entry point ``kd`` (see ``kdd kd --help``)."""

from entrypoints import run_stage

if __name__ == "__main__":
    run_stage("kd")
