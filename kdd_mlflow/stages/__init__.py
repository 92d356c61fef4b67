"""Stages: each is one MLflow run that consumes run ids and artifacts and produces its own."""
