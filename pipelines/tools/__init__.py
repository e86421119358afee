"""Offline tools: dataset builders (datasets.py), the webdataset and .beton writers (webdataset.py,
ffcv_convert.py; driven by convert.py), validate.py (find bad images before a run), show.py (a
recipe's views as a picture)."""
