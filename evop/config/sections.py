"""The sections of the one typed configuration of an EvoP run, and :class:`EvoPConfig` that holds them.

Every field has a description (the configuration reference is generated from them); unknown keys
are refused; cross-field checks live in validators. :meth:`EvoPConfig.search_hash` is the identity of
a search: what names its checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)

from evop.errors import BadInputError
from evop.storage.urls import credentials_problem


class ConfigError(BadInputError):
    """An invalid configuration; the message lists one line per problem (field path: reason)."""


class _Section(BaseModel):
    # allow_inf_nan=False: `sparsity=nan` says "finite number", not a bound it cannot be compared to.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """Which causal language model to prune and how to load it."""

    name_or_path: str = Field(
        "evop-assets:smollm2",
        description="Hugging Face model id, a local model directory, or 'evop-assets:smollm2' "
        "for the offline demo model prepared by `evop assets`.",
    )
    gguf_file: str | None = Field(
        None, description="GGUF file name inside name_or_path (loads and de-quantises it)."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights dtype; 'auto' is bfloat16 on CUDA and float32 on CPU."
    )
    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub; off unless you trust the repository."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")


class CalibrationConfig(_Section):
    """Where the calibration text comes from and how CCDS draws the calibration set."""

    dataset: str = Field(
        "evop-assets:wikipedia",
        description="A `datasets` name (e.g. 'wikitext'), a local .txt/.jsonl file or directory, "
        "or 'evop-assets:wikipedia' / 'evop-assets:news' for the offline demo text.",
    )
    dataset_config: str | None = Field(None, description="Dataset config name, e.g. 'wikitext-2-raw-v1'.")
    split: str = Field("train", description="Dataset split to read.")
    text_field: str = Field("text", description="Field holding the text (datasets and .jsonl).")
    pool_size: int = Field(
        512, ge=1, description="Candidate blocks cut from the text before sampling (the CCDS pool)."
    )
    block_len: int = Field(128, ge=8, description="Tokens per calibration block.")
    n_samples: int = Field(8, ge=1, description="Calibration blocks drawn from the pool.")
    method: Literal["ccds", "random"] = Field(
        "ccds", description="'ccds' (cluster-based, diverse) or 'random' (ablation baseline)."
    )
    embedder: str = Field(
        "evop-assets:minilm",
        description="Sentence-transformers model id or path, 'evop-assets:minilm', or 'model' "
        "(mean-pooled hidden states of the model being pruned).",
    )
    n_clusters: int = Field(8, ge=1, description="k-means clusters (at most pool_size).")
    per_cluster: Literal["proportional", "equal"] = Field(
        "proportional", description="How many samples each cluster gets."
    )
    within_cluster: Literal["nearest", "random"] = Field(
        "nearest", description="Which members of a cluster are drawn: nearest to centroid, or random."
    )
    seed: int = Field(0, description="Seed for pool selection, k-means and sampling.")
    order: Literal["text", "mixed"] = Field(
        "text",
        description="Order of the calibration blocks, hence what racing's first batches see: 'text', "
        "or 'mixed' (round-robin over the CCDS clusters; random sampling: over text stretches).",
    )

    @model_validator(mode="after")
    def _enough_pool(self) -> "CalibrationConfig":
        if self.n_samples > self.pool_size:
            raise ValueError(f"n_samples ({self.n_samples}) exceeds pool_size ({self.pool_size})")
        if self.method == "ccds" and self.n_clusters > self.pool_size:
            raise ValueError(f"n_clusters ({self.n_clusters}) exceeds pool_size ({self.pool_size})")
        return self


SearchMethod = Literal["evop", "sleb", "shortgpt", "ppl-oneshot", "evopress", "random", "exhaustive"]


class SearchConfig(_Section):
    """EPPS: the genetic search over pruning patterns (or a baseline method, for comparisons)."""

    method: SearchMethod = Field(
        "evop",
        description="'evop' (the genetic search) or a baseline: 'sleb' (greedy, re-scored each round), "
        "'shortgpt' (Block Influence), 'ppl-oneshot' (Shortened LLaMA), 'evopress' ((1+lambda) with "
        "staged token budgets), 'random' (best of `budget` patterns), 'exhaustive' (every pattern).",
    )

    sparsity: float | None = Field(
        0.2, gt=0, lt=1, description="Fraction of decoder layers to remove (k = round(sparsity*L))."
    )
    num_remove: int | None = Field(None, ge=1, description="Explicit number of layers to remove.")
    protected_layers: list[int] = Field(
        default_factory=lambda: [0, -1],
        description="Layers never removed; negative indices count from the end.",
    )
    population: int = Field(16, ge=2, description="Patterns per generation.")
    generations: int = Field(20, ge=1, description="Maximum generations after the initial one.")
    patience: int = Field(
        6, ge=1, description="Stop when the best fitness has not improved for this many generations."
    )
    selection: Literal["tournament", "truncation"] = Field("tournament", description="Parent selection.")
    tournament_size: int = Field(3, ge=2, description="Contestants per tournament.")
    truncation_fraction: float = Field(
        0.5, gt=0, le=1, description="Top fraction eligible as parents under truncation selection."
    )
    crossover_rate: float = Field(0.8, ge=0, le=1, description="Probability a child comes from crossover.")
    mutation_rate: float = Field(0.9, ge=0, le=1, description="Probability a child is mutated.")
    max_swaps: int = Field(3, ge=1, description="Most swap mutations applied to one child.")
    elitism: int = Field(2, ge=1, description="Best patterns copied unchanged into the next generation.")
    polish_rounds: int = Field(
        10,
        ge=0,
        description="After the GA stops: rounds of local search around the best pattern, each "
        "scoring every pattern that moves one removed layer to a kept layer at most `polish_radius` "
        "layers from a removed one, and keeping the best; ends early at a local optimum. 0: off.",
    )
    polish_radius: int = Field(
        1, ge=1, description="How far (in layers) from the removed ones a polish move may put a layer."
    )
    polish_pairs: int = Field(
        0, ge=0, description="At a polish local optimum, also score every pair of its this many most "
        "promising moves made at once (two layers moved), and go on if one is better; 0: off."
    )
    racing_ratio: float | None = Field(
        None,
        gt=1,
        description="Racing: score a candidate one calibration batch (stage) at a time and stop as "
        "soon as its fitness on the batches scored so far is above racing_ratio x the best pattern's "
        "on the same batches; it then ranks after every fully scored pattern. None: off (every "
        "candidate is scored on all blocks).",
    )
    racing_widen: bool = Field(
        False,
        description="Racing: widen the ratio on the first batches, to racing_ratio ** sqrt(N / n) after "
        "n of N batches (a partial mean's noise shrinks as 1/sqrt(n)); false: racing_ratio throughout.",
    )
    racing_min_stages: int = Field(
        1, ge=1, description="Racing: batches a candidate is always scored on before it can be stopped."
    )
    racing_confidence: float | None = Field(
        None,
        gt=0.5,
        lt=1,
        description="Racing: also stop a candidate once a paired one-sided t-test over the batches "
        "scored so far says, at this confidence, that its mean loss is above the best pattern's on "
        "the same batches (catches near misses the ratio lets through; at least 2 batches). None: off.",
    )
    validation_blocks: int = Field(
        0,
        ge=0,
        description="Choose the final pattern on data the search did not fit: this many pool blocks "
        "outside the calibration set score the `validation_candidates` best patterns, and the lowest "
        "validation loss wins. 0: off (the best calibration fitness wins).",
    )
    validation_candidates: int = Field(
        5, ge=1, description="Best patterns that compete on the validation blocks."
    )
    survivors: Literal["generational", "plus"] = Field(
        "generational",
        description="'generational': the elites and the children replace the population (keeps "
        "exploring); 'plus': the best `population` of parents and children survive ((mu + lambda), "
        "converges faster, and on the demo model stalled at its seed).",
    )
    max_attempts: int = Field(
        50, ge=1, description="Tries per child to produce a pattern not yet seen before giving up."
    )
    seed: int = Field(0, description="Seed of the search.")
    initial_patterns: list[Literal["shortgpt", "ppl-oneshot"]] = Field(
        default_factory=lambda: ["shortgpt"],
        description="Heuristic patterns placed in EvoP's initial population next to random ones: "
        "'shortgpt' (lowest Block Influence, one dense forward), 'ppl-oneshot' (least harmful single "
        "layers, L more evaluations). []: a random initial population only.",
    )
    mutation_prior: Literal["block-influence", "none"] = Field(
        "block-influence",
        description="'block-influence': swap mutation prefers removing layers of low Block Influence "
        "(from the same dense forward as the 'shortgpt' seed) and putting back layers of high; "
        "'none': uniform swaps.",
    )
    budget: int | None = Field(
        None, ge=1, description="Evaluations of 'random' (None: population x (generations + 1))."
    )
    exhaustive_limit: int = Field(
        10_000, ge=1, description="'exhaustive' refuses problems with more candidate patterns than this."
    )
    evopress_generations: int | None = Field(
        None,
        ge=1,
        description="Generations of 'evopress' (None: k(L-k)/1.5, the EvoPress paper's rule).",
    )
    evopress_offspring: int = Field(16, ge=1, description="Children per 'evopress' generation (lambda).")
    evopress_survivors: int = Field(
        2, ge=1, description="Children of the cheap first stage re-scored on all calibration tokens."
    )
    evopress_cheap_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of the calibration blocks 'evopress' scores all children on.",
    )

    @property
    def racing(self) -> bool:
        """Whether candidates are raced (scored stage by stage and stopped when clearly out)."""
        return self.racing_ratio is not None or self.racing_confidence is not None

    @model_validator(mode="after")
    def _one_size(self) -> "SearchConfig":
        if self.num_remove is not None:
            if self.sparsity is not None and "sparsity" in self.model_fields_set:
                raise ValueError(
                    f"sparsity ({self.sparsity}) and num_remove ({self.num_remove}) are both set: keep "
                    "one (e.g. search.sparsity=null to remove exactly num_remove layers)"
                )
            # The count replaces the default sparsity; clearing it keeps the resolved config unambiguous.
            object.__setattr__(self, "sparsity", None)
        elif self.sparsity is None:
            raise ValueError("set search.sparsity or search.num_remove")
        if self.elitism >= self.population:
            raise ValueError(f"elitism ({self.elitism}) must be below population ({self.population})")
        if self.evopress_survivors > self.evopress_offspring:
            raise ValueError(
                f"evopress_survivors ({self.evopress_survivors}) exceeds evopress_offspring "
                f"({self.evopress_offspring})"
            )
        return self


class FitnessConfig(_Section):
    """How a pattern is scored (lower is better)."""

    metric: Literal["ppl", "kl"] = Field(
        "ppl", description="'ppl': calibration perplexity; 'kl': KL divergence to the dense model."
    )
    batch_size: int = Field(8, ge=1, description="Calibration blocks per forward pass.")
    token_budget: int | None = Field(
        None, ge=1, description="Score on at most this many calibration tokens (None: all)."
    )
    kl_top_k: int = Field(
        64, ge=1, description="Dense next-token probabilities kept per position for 'kl' (bounds memory)."
    )
    prefix_cache_mb: float = Field(
        1024,
        ge=0,
        description="Memory for the dense hidden states shared by all candidates: a pattern's forward "
        "starts at its first removed layer instead of layer 0 (0 turns it off).",
    )
    aggregate: Literal["mean", "clusters", "worst-cluster"] = Field(
        "mean",
        description="How per-block losses become the fitness: 'mean' over all calibration tokens; "
        "'clusters': the mean of the per-cluster means (every CCDS cluster counts the same); "
        "'worst-cluster': the worst cluster's mean (robustness across the text's variety). The "
        "cluster aggregates need calibration.method: ccds.",
    )


class EvaluationConfig(_Section):
    """How the pipeline scores the dense and the pruned model after the search."""

    heldout: list[str] = Field(
        default_factory=lambda: ["evop-assets:news"],
        description="Held-out text sources (other domains than the calibration text) for perplexity.",
    )
    block_len: int = Field(
        256, ge=8, description="Tokens per held-out window (windows overlap when stride < block_len)."
    )
    max_blocks: int | None = Field(16, ge=1, description="Held-out windows per source (None: all).")
    stride: int | None = Field(
        None,
        ge=1,
        description="Tokens between held-out window starts (None: block_len, non-overlapping). Below "
        "block_len, windows overlap and each scores only its last `stride` tokens, the rest is context.",
    )
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    tasks: list[str] = Field(
        default_factory=lambda: ["evop_lastword", "evop_continuation"],
        description="lm-eval tasks for dense and pruned: the offline tasks built from task_source "
        "(evop_lastword, evop_continuation), tasks in include_path, or standard names (arc_easy, "
        "hellaswag, ...) where their data is reachable. Empty: skip lm-eval.",
    )
    task_source: str = Field(
        "evop-assets:news", description="Held-out .jsonl text the offline tasks are built from."
    )
    task_examples: int = Field(200, ge=1, description="Examples per offline task.")
    include_path: str | None = Field(None, description="Directory of extra lm-eval task YAMLs.")
    num_fewshot: int = Field(0, ge=0, description="lm-eval few-shot examples.")
    limit: int | None = Field(None, ge=1, description="lm-eval examples per task (None: all).")
    lm_eval_batch_size: int = Field(16, ge=1, description="lm-eval batch size.")
    speed: bool = Field(True, description="Measure dense vs pruned prefill/decode speed.")
    speed_runs: int = Field(8, ge=1, description="Timed runs per model, interleaved (>= 2: a 95% interval).")
    prompt_len: int = Field(128, ge=1, description="Prompt tokens of the speed benchmark.")
    new_tokens: int = Field(32, ge=1, description="Generated tokens of the speed benchmark.")

    @model_validator(mode="after")
    def _stride_fits(self) -> "EvaluationConfig":
        if self.stride is not None and self.stride > self.block_len:
            raise ValueError(f"stride ({self.stride}) exceeds block_len ({self.block_len})")
        return self


class RegistryConfig(_Section):
    """Where the run is tracked and the pruned model registered (MLflow)."""

    enabled: bool = Field(True, description="Log the run to MLflow and register the pruned model.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (sqlite:///..., http://host:5000, ...). None: "
        "$MLFLOW_TRACKING_URI if set, else sqlite:///<output_dir>/mlflow.db.",
    )
    experiment: str = Field("evop", description="MLflow experiment the runs are logged to.")
    registered_model: str = Field(
        "evop-pruned", description="Registered model name; each pipeline run adds a version."
    )
    artifact_location: str | None = Field(
        None,
        description="Artifact root of a newly created experiment, e.g. s3://bucket/prefix (S3-compatible "
        "servers: set MLFLOW_S3_ENDPOINT_URL). None: the tracking server's default.",
    )

    @field_validator("tracking_uri", "artifact_location")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        return _no_credentials_in(value)


HASH_NEUTRAL_DEFAULTS: dict[tuple[str, str], Any] = {
    ("calibration", "order"): "text",
    ("fitness", "aggregate"): "mean",
    ("search", "racing_ratio"): None,
    ("search", "racing_min_stages"): 1,
    ("search", "racing_confidence"): None,
    ("search", "racing_widen"): False,
    ("search", "polish_pairs"): 0,
    ("search", "validation_blocks"): 0,
    ("search", "validation_candidates"): 5,
}
"""(section, field) -> default: fields that did not exist when earlier searches were checkpointed."""


def without_neutral_defaults(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A section's dumped ``values`` without the :data:`HASH_NEUTRAL_DEFAULTS` fields at their
    default: what identifies a search (or its scores) across versions of this config."""
    missing = object()
    return {k: v for k, v in values.items() if HASH_NEUTRAL_DEFAULTS.get((section, k), missing) != v}


class StorageConfig(_Section):
    """How the checkpoint store is used: retries through outages, and one run at a time per search."""

    retry_s: float = Field(
        300,
        ge=0,
        description="Seconds a transient storage failure (an outage, a timeout) is retried, with pauses "
        "growing from 1 s to 30 s, before the step fails; what the step computed stays in memory "
        "meanwhile. 0: no retries.",
    )
    lease_s: float = Field(
        120,
        ge=1,
        description="A search is computed by one run at a time: the run holds a lease in the store, "
        "renewed every third of this time. A second run of the same search waits for it, and takes "
        "over a killed run's lease this long after its last renewal (at once on the same host).",
    )


def _no_credentials_in(url: str | None) -> str | None:
    """A URL field's validator: a secret in a URL would be copied into logs and results."""
    problem = credentials_problem(url)
    if problem is not None:
        raise ValueError(problem)
    return url


class ScaleConfig(_Section):
    """Where candidate patterns are scored: here, or on a pool of Ray actors each holding the model
    once (several GPUs, or CPU workers). Results are the same either way; only the time changes."""

    backend: Literal["local", "ray"] = Field("local", description="'local': this process; 'ray': Ray actors.")
    address: str | None = Field(
        None, description="Ray cluster ('ray://head:10001', 'head:6379'); empty: RAY_ADDRESS, else local."
    )
    workers: PositiveInt | Literal["auto"] = Field(
        "auto", description="Actors; 'auto': one per visible GPU (gpus_per_worker > 0), else per CPU core."
    )
    gpus_per_worker: float = Field(0, ge=0, description="GPUs of each actor (above 1: the model split).")
    threads_per_worker: int = Field(1, ge=1, description="CPU threads (torch) each actor uses.")
    start_timeout_s: float = Field(600, gt=0, description="Seconds for every actor to load the model.")
    max_restarts: int = Field(3, ge=0, description="Restarts of a lost actor before it is dropped.")


class EvoPConfig(_Section):
    """A whole EvoP run: model, calibration, search, fitness and output."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    fitness: FitnessConfig = Field(default_factory=FitnessConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    output_dir: str = Field("runs/evop", description="Where result.json and the pruned model go.")
    checkpoints: str | None = Field(
        None,
        description="Checkpoint store of the pipeline: file:///path or s3://bucket/prefix (default: "
        "<output_dir>/checkpoints). S3 credentials and endpoint come from the AWS environment "
        "(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.aws), never from this file.",
    )

    @field_validator("output_dir")
    @classmethod
    def _a_directory(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty: give a directory (an empty one would write into the current directory)")
        return value

    @field_validator("checkpoints")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        return _no_credentials_in(value)

    @model_validator(mode="after")
    def _clusters_need_ccds(self) -> "EvoPConfig":
        if self.search.validation_blocks + self.calibration.n_samples > self.calibration.pool_size:
            raise ValueError(
                f"search.validation_blocks ({self.search.validation_blocks}) + calibration.n_samples "
                f"({self.calibration.n_samples}) exceed calibration.pool_size ({self.calibration.pool_size})"
            )
        if self.fitness.aggregate != "mean" and self.calibration.method != "ccds":
            raise ValueError(
                f"fitness.aggregate={self.fitness.aggregate} needs CCDS clusters (calibration.method: ccds)"
            )
        return self

    def search_hash(self) -> str:
        """Short hash of everything that determines the search result (not where results go). Fields
        at their :data:`HASH_NEUTRAL_DEFAULTS` are left out: earlier checkpoints keep their hash."""
        payload = self.model_dump(mode="json", include={"model", "calibration", "search", "fitness"})
        payload = {section: without_neutral_defaults(section, v) for section, v in payload.items()}
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
