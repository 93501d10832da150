"""Stage one: run a frozen backbone once over a dataset and write the features to the feature file.

datasets     where samples come from: torchvision sets by name, image folders (split, identity, verify)
backbones    the one door: ``BACKBONE_FAMILIES``, ``load_backbone`` -> model and its preprocessing together,
             ``rebuild_backbone(record)``; pooled inner layers (``with_outputs``)
families     the ``BackboneFamily`` interface, ``Backbone``, ``BackboneRecord``; torchvision_models and
             timm_models are the two families
preprocessing  ``Preprocessing`` and its one reader; PIL's resize on tensors
precision    ``--precision``: the backbone's arithmetic, in one place
batches      batch sources (PIL loader workers, in-memory arrays, JPEGs decoded on the GPU); one per split
extract      the plan (decided once: device, sources, batch size, fingerprint) and the extraction loop
distributed  ``torchrun``: one shard per rank, merged by rank 0
"""
