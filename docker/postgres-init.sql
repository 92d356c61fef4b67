-- Run once, when the PostgreSQL volume is first created: one database per store.
CREATE DATABASE mlflow;       -- MLflow's experiments, runs, params, metrics and tags
CREATE DATABASE mlflow_auth;  -- MLflow's basic-auth users and permissions
CREATE DATABASE optuna;       -- the Optuna studies the tuning workers share
