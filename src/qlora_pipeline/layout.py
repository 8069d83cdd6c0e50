"""Names of the files the stages write inside their output folders, for every module that reads them.

The folders themselves are named in ``dvc.yaml`` alone; these are the names inside them, at the
bottom layer so that readers in ``modeling/`` and ``serving/`` need not import the stages' plumbing.
"""

CONVERSATIONS = "conversations.jsonl"
MANIFEST = "manifest.json"
# Beside a trained adapter: the params it was trained with, resolved (train-adapter writes, the rest read).
RESOLVED_CONFIG = "training_config.json"
