"""MLproject entry point ``train`` (see ``kdd train --help``)."""

from entrypoints import run_stage

if __name__ == "__main__":
    run_stage("train")
