"""Stage one: images -> per-block tokens in the cache (manifests, layouts, decoding, backbones, the loop).

``manifest``/``layouts`` list a split's images (``parquet``: rows of Parquet files; ``sources`` reads any row); ``images``/``augment`` make pixels (a new perturbation goes in
``augment``); ``backbone`` taps a vision transformer; ``loop`` runs pixels through it shard by shard,
``distribute`` shares shards among processes (``claims``), ``repair`` checks what a resume may trust, and
``extract`` wires them (``run_extract``); ``audit`` checks a split for metadata shortcuts. Never imports stage
two, results, the report or the product. The names below load their module on first use.
"""

from ..lazy import lazy_face

_MODULES = {
    "audit": ("AuditConfig", "read_headers", "run_audit"),
    "backbone": ("Backbone", "BackboneConfig", "BlockSelectionError", "local_content_hash", "weight_files"),
    "options": (
        "ExtractConfig",
        "ExtractError",
        "ExtractSummary",
        "OptionError",
        "StageTimes",
        "TooManyInvalid",
        "store_path",
        "variant_group_of",
    ),
    "extract": ("run_extract",),
    "images": ("IMAGE_EXTENSIONS", "ImageDecodeError", "convert_to_rgb_array", "decode_image", "decode_image_bytes"),
    "image_headers": ("ImageHeader", "describe_file", "read_image_header"),
    "loop": ("BatchWork", "FinishedShard", "ForwardStep", "ImageSource", "PixelRecipe", "extract_shards"),
    "layouts": ("LAYOUTS", "LayoutConfig", "build_manifest"),
    "manifest": (
        "Manifest",
        "ManifestError",
        "ManifestRow",
        "manifest_path",
        "read_manifest",
        "read_sidecar",
        "sidecar_path",
        "write_manifest",
    ),
}
__all__, __getattr__, __dir__ = lazy_face(__name__, _MODULES)
