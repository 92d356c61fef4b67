"""kdd-mlflow: dataset distillation (MTT) and knowledge distillation, combined and tracked in MLflow."""

__version__ = "0.1.0"
