"""MLproject entry point ``evaluate`` (see ``kdd evaluate --help``)."""

from entrypoints import run_stage

if __name__ == "__main__":
    run_stage("evaluate")
