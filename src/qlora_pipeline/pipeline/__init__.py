"""One module per DVC stage: what the stage does, given the loaded params and the paths dvc.yaml passes.

Each stage function computes everything in memory, then writes its outputs whole (temp name,
then rename) and logs its params section and metrics to the execution's MLflow run.
``stages/*.py`` only parse those paths and call these.
"""
