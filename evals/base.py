"""What every evaluation protocol sees and returns.

A benchmark (``evals/benchmarks/*.yaml``, or a user's own YAML file) names a dataset, a task and the
metrics; ``dermgraph eval`` loads it into :class:`Benchmark`, reads its cases into :class:`EvalCase`
objects and hands a :class:`ProtocolContext` to the protocol registered for the task. The protocol
returns a :class:`ProtocolResult`; the runner writes ``metrics.json``, the Markdown report and plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evals.filters import FilterRule, filter_function

Task = Literal["diagnosis", "modality", "morphology", "zero_shot", "linear_probe", "vqa_text", "reasoner"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DatasetSpec(_Strict):
    """Where the cases are. ``${DATA}`` in paths expands to the shared data folder
    (``models.paths.data_dir()``); other relative paths are relative to the benchmark YAML file."""

    path: str = Field(description="CSV or JSONL file with one case per row.")
    image_root: str | None = Field(None, description="Folder image paths are relative to (default: the file's folder).")
    image_column: str | None = Field("image", description="Column with the image path; None for text-only sets.")
    id_column: str | None = Field(None, description="Column with a case id (default: the image path or row number).")
    label_column: str | None = Field(None, description="Column with the ground-truth label.")
    label_map: dict[str, str] = Field(default_factory=dict, description="Raw label → benchmark label (e.g. Derm7pt diagnoses → HAM classes).")
    metadata: dict[str, str] = Field(default_factory=dict, description="Agent metadata field (age, sex, site, fitzpatrick) → column.")
    group_columns: dict[str, str] = Field(default_factory=dict, description="Fairness/grouping name → column (e.g. sex: sex, age: age).")
    question_column: str | None = None
    answer_column: str | None = Field(None, description="Reference answer text (VQA text metrics).")
    extra_columns: list[str] = Field(default_factory=list, description="Other columns kept on each case (e.g. the 7-point criteria).")
    filter: dict[str, list[str]] = Field(default_factory=dict, description="Keep rows whose column value is in the list, e.g. {split: [val]}.")
    drop_unmapped: bool = Field(False, description="Drop rows whose label is not in label_map (when label_map is given).")
    filter_fn: dict[str, str] = Field(
        default_factory=dict,
        description="Keep rows for which a registered filter function of a column is true: column → name in "
        "evals.filters.FILTER_FUNCTIONS, e.g. {sha1: dermnet_heldout}. Benchmarks never import code.",
    )
    where: list[FilterRule] = Field(
        default_factory=list,
        description="Declarative row rules, all of which must hold: {column, in | not_in | regex | hash_split: {every, keep, of}}.",
    )

    @field_validator("filter_fn")
    @classmethod
    def _registered(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v.values():
            filter_function(name)  # FilterError (a ValueError) names the registered filters
        return v


class Benchmark(_Strict):
    """One benchmark definition (data, not code)."""

    name: str
    description: str = ""
    task: Task
    dataset: DatasetSpec
    labels: list[str] = Field(default_factory=list, description="The label set, in report order.")
    aliases: dict[str, list[str]] = Field(default_factory=dict, description="label → other names an answer may use.")
    positive: str | None = Field(None, description="Label whose sensitivity/specificity is reported (e.g. mel).")
    metrics: list[str] = Field(default_factory=list, description="Headline metrics (names from evals.metrics); empty = the task's defaults.")
    seen_by_default_classifier: bool = Field(False, description="The default encoder was trained on these images: figures are optimistic.")
    licence: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="Protocol-specific options (e.g. coverages, age bins, probe Cs).")
    source_file: Path | None = Field(None, exclude=True, description="The YAML file this was loaded from (set by the loader).")

    @model_validator(mode="after")
    def _positive_is_a_label(self) -> "Benchmark":
        # A positive class outside the label set would silently drop the sensitivity/specificity metrics.
        if self.positive is not None and self.positive not in self.labels:
            listed = ", ".join(self.labels) if self.labels else "none (add a labels list)"
            raise ValueError(f"positive {self.positive!r} is not one of the benchmark's labels: {listed}")
        return self


@dataclass
class EvalCase:
    """One row of a benchmark, resolved."""

    id: str
    image: Path | None
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    question: str | None = None
    answer: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class PredictionStore(Protocol):
    """Per-case prediction cache (keyed by image hash + config hash + case inputs); see evals.cache."""

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, record: dict) -> None: ...


@dataclass
class ProtocolContext:
    bench: Benchmark
    cases: list[EvalCase]
    out_dir: Path
    cache: PredictionStore
    agent_config: Any = None
    """An ``agent.config.AgentConfig`` (protocols that run the agent or its models)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Benchmark options merged with command-line ones (``--opt key=value``)."""
    workers: int = 1
    log: Callable[[str], None] = print
    rescore: bool = False
    """Score from the cache only: load no model, fail if a case has no prediction."""
    agent_factory: Callable[[Any], Any] | None = None
    """``factory(agent_config) -> Agent``; None builds ``agent.agent.Agent(config)``. Must be a module-level
    function when ``workers > 1`` (it is sent to the worker processes). Tests pass agents with doubles."""


@dataclass
class ProtocolResult:
    """``metrics``: JSON-able; headline metrics as ``{"value": v, "ci95": [lo, hi]}`` where a CI applies.
    ``tables``: title → Markdown table. ``plots``: title → PNG path (inside ``out_dir``)."""

    metrics: dict[str, Any]
    tables: dict[str, str] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)
    n_cases: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Predictions:
    """What a protocol's ``predict`` step returns and its ``score`` step reads: one record per case of
    ``ProtocolContext.cases`` (None: no prediction, under ``allow_partial``), and how they were obtained
    (cache hits, computed, fingerprint)."""

    records: list[dict[str, Any] | None]
    stats: dict[str, Any] = field(default_factory=dict)


ProtocolFn = Callable[[ProtocolContext], ProtocolResult]
