"""Dataset preparation: official archives (or extracted folders) -> array_record.

* `recipes`: one `prepare_*` function per dataset (ImageNet-1k through the tfds
  builder; Caltech-101, Caltech-256, MIT Indoor-67 and any `class/file` image
  folder through `records`), and `DATASETS`, the recipes by name.
* `archives`: reads the official archives (tar, compressed tar, tar inside a
  zip) or their extracted folders as `{path: reader}` and groups image paths
  by class.
* `records`: writes record sources as an `ArrayRecordSource` dataset
  (`write_record_dataset`), checking and if needed re-encoding every image.
"""
