"""The batched augment stage, on the training device: ops.py (pixel ops), masks.py (MSCN / SimMIM
masks and fills), mixing.py (MixMask, Un-Mix), engine.py (the Augmenter), plan.py (its host plan
and parameter draws), types.py (what it returns), recipes.py (the yaml schema of recipes/*.yaml)."""
