"""Offline tools: dataset builders (fashion_mnist.py, photos.py; what they share: imagefolder_build.py),
the webdataset and .beton writers (webdataset.py, ffcv_convert.py; driven by convert.py), validate.py
(find bad images before a run), show.py (a recipe's views as a picture)."""
