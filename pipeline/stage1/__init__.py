"""Stage one: run a frozen backbone once over a dataset and write the features to the feature file.

datasets     where samples come from: torchvision sets by name, image folders (split, identity, verify)
backbones    ``load_backbone`` -> model and its preprocessing together; PIL's resize on tensors
precision    ``--precision``: the backbone's arithmetic, in one place
batches      batch sources (PIL loader workers, in-memory arrays, JPEGs decoded on the GPU); one per split
extract      the plan (decided once: device, sources, batch size, fingerprint) and the extraction loop
distributed  ``torchrun``: one shard per rank, merged by rank 0
"""
