"""The feature file: the contract between stage one (extract) and stage two (heads).

The schema, the writer's commits and the partial ``.tmp`` policy are written once, in docs/schema.md (and
docs/reliability.md): this package is their one implementation. Stage two reads files only through
:func:`read_features`, stage one writes them only through :class:`FeatureWriter`.

record   :class:`FeatureMeta` (the root attributes) and its one encoder and decoder, the versioned reader that
         upgrades older files, the fingerprint, :class:`WeightsIdentity`, :func:`describe_change`
read     opened only when it reads nothing outside itself, validated, one layer selected: :func:`read_features`
rows     what a split holds (its counters) and its rows block by block: the resume and the torchrun merge
write    :class:`FeatureWriter`: commits, disk-space checks, resume, merge, the regression targets
The lock is :mod:`pipeline.locks` (a head folder's too); :class:`FileLock` here is the feature file's.
"""

from pipeline.store.read import (
    ALL_LAYERS,
    FINAL_LAYER,
    FeatureSet,
    SplitFeatures,
    check_classes_have_rows,
    layer_columns,
    read_activations,
    read_dataset_files,
    read_features,
    read_meta,
    refuse_outside_reads,
    resolve_layer,
    select_layer,
)
from pipeline.store.record import (
    DEFAULTS,
    FORMAT,
    IDENTITY_VERSION,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    SPLITS,
    FeatureMeta,
    WeightsIdentity,
    describe_change,
    encode_attr,
    files_digests_lines,
    fingerprint,
    library_versions,
)
from pipeline.store.rows import FeatureReadError, Progress, Rows, StoredFile
from pipeline.store.write import (
    AUDIT_COLUMNS,
    DIGESTS,
    PHASH,
    DiskFull,
    FeatureFileLock,
    FeatureWriter,
    TargetColumn,
    check_output_name,
    free_bytes,
    rewrite_targets,
    storable_name,
    tmp_path_for,
    write_targets,
)

FileLock = FeatureFileLock  # the name extract, the torchrun merge and stage two's head-folder lock import

__all__ = [
    "ALL_LAYERS",
    "AUDIT_COLUMNS",
    "DEFAULTS",
    "DIGESTS",
    "FINAL_LAYER",
    "FORMAT",
    "IDENTITY_VERSION",
    "PHASH",
    "READABLE_VERSIONS",
    "SCHEMA_VERSION",
    "SPLITS",
    "DiskFull",
    "FeatureFileLock",
    "FeatureMeta",
    "FeatureReadError",
    "FeatureSet",
    "FeatureWriter",
    "FileLock",
    "Progress",
    "Rows",
    "SplitFeatures",
    "StoredFile",
    "TargetColumn",
    "WeightsIdentity",
    "check_classes_have_rows",
    "check_output_name",
    "describe_change",
    "encode_attr",
    "files_digests_lines",
    "fingerprint",
    "free_bytes",
    "layer_columns",
    "library_versions",
    "read_activations",
    "read_dataset_files",
    "read_features",
    "read_meta",
    "refuse_outside_reads",
    "resolve_layer",
    "rewrite_targets",
    "select_layer",
    "storable_name",
    "tmp_path_for",
    "write_targets",
]
