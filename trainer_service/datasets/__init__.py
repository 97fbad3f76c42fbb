"""A job's datasets, from S3 to arrays the engine trains on (docs/architecture.md §4).

1. `listing.list_image_folder` lists `{prefix}/{label}/{image}`; `listing.dataset_fingerprint` identifies its content.
2. `splits.stratified_split` holds out a fraction of every label for validation, deterministically for a seed;
   `splits.label_warnings` flags labels with too few images.
3. `cache.materialize` downloads and decodes every image once into a uint8 memmap [N, 3, S, S] on local disk,
   cached across jobs; the engine (`trainer_service.engine`) reads its rows and never sees S3.
"""
