"""The label value the loss skips, shared by the data that writes labels and the models that read them.

It is PyTorch's and transformers' default ``ignore_index``; at the bottom layer so that
``data/formatting.py`` need not import ``modeling/``.
"""

IGNORE_INDEX = -100
