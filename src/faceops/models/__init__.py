"""Models: recognizers (EdgeFace family, insightface IResNet, the seed's ResNet-34) behind one
interface, margin heads, the DSR super-resolution network, and loading of users' pretrained weights.

Importing this package registers every backbone, head and network, so names in configs resolve.
"""

from faceops.models.dsr import SR_NETWORKS, DSRConfig, DSRNet, create_dsr, parse_size
from faceops.models.edgeface import EdgeFaceTrunk, LowRankLinear, replace_linear_with_low_rank
from faceops.models.heads import EMBEDDING_HEADS, create_embedding_head
from faceops.models.iresnet import IBasicBlock, IResNetTrunk
from faceops.models.margins import (
    MARGIN_HEADS,
    ArcFace,
    CombinedMargin,
    CosFace,
    MarginHead,
    MarginHeadConfig,
    create_margin_head,
)
from faceops.models.pretrained import LoadReport, PretrainedLoadError, load_pretrained, read_state_dict
from faceops.models.recognizer import (
    BACKBONES,
    Recognizer,
    RecognizerConfig,
    count_parameters,
    create_recognizer,
    register_backbone,
)
from faceops.models.registry import Registry
from faceops.models.resnet import ResNetTrunk

__all__ = [
    "BACKBONES", "EMBEDDING_HEADS", "MARGIN_HEADS", "SR_NETWORKS", "Registry", "register_backbone",
    "Recognizer", "RecognizerConfig", "create_recognizer", "count_parameters", "create_embedding_head",
    "EdgeFaceTrunk", "LowRankLinear", "replace_linear_with_low_rank", "ResNetTrunk", "IResNetTrunk", "IBasicBlock",
    "MarginHead", "MarginHeadConfig", "ArcFace", "CosFace", "CombinedMargin", "create_margin_head",
    "LoadReport", "PretrainedLoadError", "load_pretrained", "read_state_dict",
    "DSRConfig", "DSRNet", "create_dsr", "parse_size",
]
