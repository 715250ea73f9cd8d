"""Every choice list and default of the pipeline, in one place that imports nothing (open_clip's ``constants.py``).

Modules, the CLI's options and the docs take their words and defaults from here, never a copy. One sentence
settles two words: the **cache** is the set of feature **stores** (one Zarr store per split, backbone and tap,
``cache/<model>/<tap>/<split>.zarr``); a store holds **variants** (``center``, views, crops, perturbed copies).
"""

# ----------------------------------------------------------------------------- backbones and stores
DEFAULT_MODEL = "openai/clip-vit-large-patch14"  # the paper's backbone and the released heads'
PAPER_BACKBONES: tuple[str, ...] = ("openai/clip-vit-large-patch14", "openai/clip-vit-base-patch32")
TAPS: tuple[str, ...] = ("ln2", "hidden")  # ln2: the authors' tensor (inside the block); hidden: block outputs
DEFAULT_TAP = "ln2"
EMBEDDING_TAP = "embedding"  # not a tap of the blocks: the model's pooled image embedding, from the same pass
STORE_DTYPES: tuple[str, ...] = ("float16", "float32")  # dtypes of the stored features
DEFAULT_STORE_DTYPE = "float16"
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")  # dtypes the backbone may run in
DEFAULT_SHARD_ROWS = 1024  # rows per shard file: the unit of work, resume and distribution
DEFAULT_CHUNK_ROWS = 256  # rows per inner chunk (must divide the shard rows)
DEFAULT_MAX_PIXELS = 100_000_000  # larger images are recorded as invalid rather than decoded
DEFAULT_MAX_INVALID = 0.05  # share of undecodable rows above which `pipeline extract` exits 3
DEFAULT_CLAIM_TIMEOUT = 300.0  # seconds without a refresh after which another process takes a shard's claim over
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"

# ----------------------------------------------------------------------------- variants
CENTER = "center"  # the evaluation crop
TEN_CROP = "tencrop"  # the group of the ten crops tencrop_0 .. tencrop_9, scored by their mean logit
TEN_CROP_COUNT = 10
VIEWS = "views"  # the group of seeded augmented training views view_000, view_001, ...
PERTURBATIONS: tuple[str, ...] = ("blur", "crop", "jpeg", "noise", "combined")  # the paper's Table 5
PERTURB_PRESETS: tuple[str, ...] = ("official", "paper")  # the authors' code's parameters, or the paper's text's
DEFAULT_PERTURB_PRESET = "official"
FORMAT_ALIGN = "format-align"  # every image re-encoded as one JPEG; stored as format-align-q<quality>
DEFAULT_ALIGN_QUALITY = 95
UNPERTURBED_VARIANTS: tuple[str, ...] = (CENTER, TEN_CROP)

# ----------------------------------------------------------------------------- manifests
LAYOUT_NAMES: tuple[str, ...] = (
    "cnndetection-train",
    "cnndetection-val",
    "cnndetection-test",
    "ufd-diffusion",
    "synthbuster",
    "ldm-train",
    "ldm-val",
    "genimage-train",
    "genimage-val",
    "parquet",
    "folder",
)
GENIMAGE_LABEL_FOLDERS: dict[str, int] = {"nature": 0, "ai": 1}  # GenImage's <generator>/<part>/{ai,nature}/
DEFAULT_PARQUET_IMAGE_COLUMN = "image"  # the Hugging Face `datasets` Image feature: a struct {bytes, path}
DEFAULT_PARQUET_LABEL_COLUMN = "label"

# ----------------------------------------------------------------------------- stage two
HEADS: tuple[str, ...] = ("rine", "linear", "knn", "logreg")  # rine: the paper's; the others read one vector
DEFAULT_HEAD = "rine"
BLOCKS_FEATURES = "blocks"  # every cached block's token (RINE only)
EMBEDDING_FEATURES = "embedding"  # the model's pooled image embedding (stored beside the tokens)
BLOCK_FEATURES_PREFIX = "block:"  # block:K, one block's token (negative K counts from the last cached block)
FEATURES_CHOICES = f"{BLOCKS_FEATURES}, {BLOCK_FEATURES_PREFIX}K or {EMBEDDING_FEATURES}"
DEFAULT_KNN_K = 20
DEFAULT_LOGREG_C = 1.0
LOGREG_MAX_ITER = 1000
HEAD_BLOCKS: tuple[str, ...] = ("all", "last")  # "last": ablation without intermediate blocks
AGGREGATIONS: tuple[str, ...] = ("tie", "mean")  # "mean": ablation without TIE
AMP_MODES: tuple[str, ...] = ("none", "bf16")  # none: float32 (the default, as the authors); bf16: an opt-in
CALIBRATIONS: tuple[str, ...] = ("none", "temperature")  # temperature: fitted on val
SELECT_ACROSS_FIELDS: tuple[str, ...] = ("epochs", "batch_size", "lr", "lr_milestones", "train_fraction")
ALL_CLASSES = "all"
ALL_DATASETS = "all"  # train_datasets of a run trained on every dataset of its training split
STANDARD_PROTOCOL = "standard"
# standard: the training split as it is; one-vs-rest: one run per dataset of it, trained on that dataset alone;
# leave-one-out: one run per dataset, trained on all the others (pipeline/heads/protocols.py)
PROTOCOLS: tuple[str, ...] = (STANDARD_PROTOCOL, "one-vs-rest", "leave-one-out")
LIST_SEPARATOR = "+"  # tuples in CSV cells: classes car+cat, lr_milestones 6+11
MAX_GROUP_SIZE = 8  # configs fitted together at most (memory grows with the group)

# ----------------------------------------------------------------------------- results
# The paper's 20 test sets, in the order of its tables.
PAPER_DATASETS: tuple[str, ...] = (
    "progan",
    "stylegan",
    "stylegan2",
    "biggan",
    "cyclegan",
    "stargan",
    "gaugan",
    "deepfake",
    "sitd",
    "san",
    "crn",
    "imle",
    "guided",
    "ldm_200",
    "ldm_200_cfg",
    "ldm_100",
    "glide_100_27",
    "glide_50_27",
    "glide_100_10",
    "dalle",
)
VAL_SPLIT = "val"
BEST_BY_VAL = "best_by_val"
BEST_BY_TEST = "best_by_test_mean_acc_ap"  # the paper's protocol
SELECTION_RULES: tuple[str, ...] = (BEST_BY_VAL, BEST_BY_TEST)
DEFAULT_THRESHOLD = 0.5  # the authors' evaluation: fake iff score > 0.5
FPR_TARGETS: dict[str, float] = {"fpr1": 0.01, "fpr5": 0.05}
THRESHOLD_RULES: tuple[str, ...] = ("val", "eer", *FPR_TARGETS)  # thresholds chosen on val, carried with a head
DEFAULT_RESAMPLES = 1000  # bootstrap resamples of the report's 95 % intervals
DEFAULT_CONFIDENCE = 0.95
# A file the demo writes into its backbone folder: the report then says the backbone has random weights.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.txt"

# ----------------------------------------------------------------------------- the product
CROPS: tuple[str, ...] = (CENTER, TEN_CROP, "auto")  # pipeline predict --crop
OUTPUT_FORMATS: tuple[str, ...] = (".csv", ".jsonl", ".parquet")  # pipeline predict --out, by suffix
REENCODINGS: tuple[str, ...] = ("jpeg75", "half", "webp")  # predict --robust: the copies each image is scored as
UNSURE = "unsure"  # predict --robust: the verdict of an image whose copies' scores straddle the threshold
VERDICTS: tuple[str, ...] = ("real", "fake", UNSURE)

# ----------------------------------------------------------------------------- the service (pipeline serve)
DEFAULT_SERVE_HOST = "127.0.0.1"  # loopback: reachable from this machine only unless --host says otherwise
DEFAULT_SERVE_PORT = 8000
DEFAULT_SERVE_BATCH = 32  # images per forward pass at most (re-encoded copies of --robust count)
DEFAULT_SERVE_MAX_WAIT_MS = 10.0  # how long the worker waits for more images before a batch
DEFAULT_SERVE_MAX_QUEUE = 256  # images waiting for the model; more: 503 with Retry-After
DEFAULT_SERVE_MAX_UPLOAD_MB = 32.0  # bytes of one request's body; more: 413
DEFAULT_SERVE_MAX_IMAGES = 64  # images of one request; more: 413
DEFAULT_SERVE_MAX_PIXELS = 50_000_000  # an image with more pixels gets a per-image error
SERVE_TOKEN_ENV = "RINE_SERVE_TOKEN"  # the bearer token when --token is not given
