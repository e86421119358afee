"""Input pipelines, in three rooms that follow the data:

    pipelines/loaders/   every step, on the host: files -> decoded crops (Batch); the loader contract
                         (loaders/common.py) and one module per loader (torchvision reference, DALI,
                         FFCV, synthetic), picked by `loader=` through `build_loader`
    pipelines/augment/   every step, on the training device: the batched augment ops, masks, mixing,
                         the Augmenter engine (engine.py) and the yaml recipes it is built from
    pipelines/tools/     offline: dataset builders, the webdataset and .beton writers, validate, show
"""
import masksiam  # noqa: F401  (makes torchvision importable first)
