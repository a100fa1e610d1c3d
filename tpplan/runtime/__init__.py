"""The code printed verbatim into the generated train.py (torch and the standard library only): tpplan's own parallel styles, the helpers, the training step, checkpoints read as data.

Imports only tpplan.core."""
