"""The batched augment stage, on the training device: ops.py (pixel ops), masks.py (MSCN / SimMIM
masks and fills), mixing.py (MixMask, Un-Mix), engine.py (the Augmenter), recipes.py (the yaml
schema of recipes/*.yaml)."""
