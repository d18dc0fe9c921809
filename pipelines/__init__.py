"""KFP pipelines composed from :mod:`faceops.components`.

Each module exposes ``build(cluster: ClusterConfig) -> pipeline`` (cluster settings are compile-time)
and ``DEFAULT_CONFIG`` (the packaged config whose YAML is the pipeline's default ``config_yaml``).
"""

PIPELINES = {
    "vlr_face": "faceops.pipelines.vlr_face",
    "arcface_resnet34": "faceops.pipelines.arcface_resnet34",
}
