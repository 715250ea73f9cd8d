"""Stage one: images -> per-block tokens in the cache (manifests, layouts, decoding, backbones, the loop).

``manifest``/``layouts`` list a split's images; ``images``/``augment`` make pixels (a new perturbation goes in
``augment``); ``backbone`` taps a vision transformer; ``loop`` runs pixels through it shard by shard,
``distribute`` shares shards among processes (``claims``), ``repair`` checks what a resume may trust, and
``extract`` wires them (``run_extract``); ``audit`` checks a split for metadata shortcuts. Never imports stage
two, results, the report or the product. The names below load their module on first use.
"""

from ..lazy import lazy_face

_EXPORTS = {
    "AuditConfig": "audit",
    "read_headers": "audit",
    "run_audit": "audit",
    "Backbone": "backbone",
    "BackboneConfig": "backbone",
    "ExtractConfig": "options",
    "ExtractError": "options",
    "ExtractSummary": "options",
    "OptionError": "options",
    "StageTimes": "options",
    "TooManyInvalid": "options",
    "store_path": "options",
    "variant_group_of": "options",
    "run_extract": "extract",
    "IMAGE_EXTENSIONS": "images",
    "ImageDecodeError": "images",
    "convert_to_rgb_array": "images",
    "decode_image": "images",
    "ImageHeader": "image_headers",
    "read_image_header": "image_headers",
    "BatchWork": "loop",
    "FinishedShard": "loop",
    "ForwardStep": "loop",
    "ImageSource": "loop",
    "PixelRecipe": "loop",
    "extract_shards": "loop",
    "LAYOUTS": "layouts",
    "LayoutConfig": "layouts",
    "build_manifest": "layouts",
    "Manifest": "manifest",
    "ManifestError": "manifest",
    "ManifestRow": "manifest",
    "manifest_path": "manifest",
    "read_manifest": "manifest",
    "read_sidecar": "manifest",
    "sidecar_path": "manifest",
    "write_manifest": "manifest",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
