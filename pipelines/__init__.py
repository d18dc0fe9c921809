"""KFP pipelines composed from :mod:`faceops.components`.

Each module exposes ``build(cluster: ClusterConfig, config_yaml: str | None) -> pipeline`` (cluster
settings are compile-time; ``config_yaml``, a run's config, sets the parameters' defaults) and
``DEFAULT_CONFIG`` (the packaged config whose YAML is the pipeline's default ``config_yaml``).
"""

PIPELINES = {
    "vlr_face": "faceops.pipelines.vlr_face",
    "arcface_resnet34": "faceops.pipelines.arcface_resnet34",
}
