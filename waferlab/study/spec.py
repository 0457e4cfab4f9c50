"""Study specs: a base training config, the data, and axes whose product gives the cells.

A spec is a YAML file or a preset name (``waferlab/configs/studies/<name>.yaml``)::

    description: what the study asks
    config: default            # base train preset or YAML file (any preset + overrides)
    set: {epochs: 4}           # overrides of the base: any config key, nested keys as model_options.x
    data: null                 # a source or cache; `study run --data` overrides it
    axes:                      # the cells are the product of the axes, in this order
      model: [resnet34, cbam]  # a list: values of one config key (any key, dotted for nested ones)
      recipe:                  # a mapping: named variants, each a set of settings (may name a `config`)
        adam: {optimizer: adam, lr: 0.0001}
        nag: {config: spanet}
      seed: [60, 61]           # the seed axis: cells that differ only in it form a group
    explain: {methods: [gradcam, gradcam++], per_class: 1, score_per_class: 20, steps: 20, road: false}

A named variant of an axis that is itself a config key and does not set it sets the key to its label
(``model: {resnet34: {}, spanet: {config: spanet}}``). Cell names come from the axis labels:
``cbam__recipe-adam__seed-60`` (the model label first without its key, the seed last).

One factor at a time (an ablation table: rows x varied factor, not the full product)::

    vary:                      # per row (each combination of the axes): the base cell, then one change each
      attn_norm:               # a factor: its named variants, each a set of settings (as an axis variant)
        not_for: [spnet]       # optional: labels of axis values (rows) this factor does not apply to (n/a)
        bn: {model_options: {attn_norm: bn}}
        ln: {model_options: {attn_norm: ln}}
        gn: {model_options: {attn_norm: gn}}
      optimizer:
        sgd: {optimizer: sgd}
        adam: {optimizer: adam, lr: 0.001}

Every row gets a ``base`` cell (its own settings) and, per factor that applies to it, one cell per variant
named ``<row>__<factor>-<variant>``. A variant whose settings the row already has (here ``ln`` when the row
sets ``attn_norm: ln``) IS the base: no cell, the report shows the base cell in that column; a variant that
resolves to the base's exact config through the base config file is refused (it would train an identical
run). Rows in ``not_for`` get no cell for the factor (``n/a`` in the report); a model option a row does not
take is caught by ``study run --dry-run``, which builds every cell's model.

Report settings (optional)::

    report: {min_defect_recall: 0.99}   # the sweep table marks the values whose mean defect recall exceeds it

``study run --set KEY=VALUE`` merges into ``set:`` (axis and vary values still win) and ``--only GLOB`` runs
the cells whose names match (see :func:`select_cells`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waferlab.errors import WaferlabError

STUDY_PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "studies"
#: Top-level keys of a spec file.
SPEC_KEYS = ("description", "config", "set", "data", "axes", "vary", "report", "explain")
#: Settings of the ``report:`` block and their defaults.
REPORT_DEFAULTS: dict[str, Any] = {"min_defect_recall": None}
#: Settings of the ``explain:`` block and their defaults.
EXPLAIN_DEFAULTS: dict[str, Any] = {
    "methods": ["gradcam", "gradcam++"],
    "per_class": 1,
    "score_per_class": 20,
    "steps": 20,
    "road": False,
}
#: Keys passed to ``waferlab train`` as their own flags (readable commands); the rest go through ``--set``.
TRAIN_FLAGS = (
    "model",
    "seed",
    "epochs",
    "image_size",
    "batch_size",
    "lr",
    "class_set",
    "encoding",
    "split",
    "loss",
    "max_maps",
)
SEED_AXIS = "seed"
MODEL_AXIS = "model"
#: The axis that ``vary:`` adds: label ``base`` or ``<factor>-<variant>``; names show the label alone.
VARY_AXIS = "vary"
BASE_LABEL = "base"
#: Reserved key of a ``vary:`` factor (not a variant): the rows it does not apply to.
NOT_FOR = "not_for"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


@dataclass(frozen=True)
class Cell:
    """One training run of the study: its axis labels, base config and settings (flat, dotted keys)."""

    name: str
    labels: tuple[tuple[str, str], ...]  # (axis, label) in axis order
    config: str
    settings: tuple[tuple[str, Any], ...]
    variant: tuple[str, str] | None = None  # (factor, variant) of a ``vary:`` cell; None for a base cell
    base: str | None = None  # a ``vary:`` variant's base cell (its name)

    @property
    def group(self) -> str:
        """The cell's name without its seed: cells of one group differ only in the seed."""
        return cell_name([(a, v) for a, v in self.labels if a != SEED_AXIS]) or "all"

    @property
    def row(self) -> str:
        """The cell's name without its seed and ``vary:`` variant: a row of the ablation table."""
        return cell_name([(a, v) for a, v in self.labels if a not in (SEED_AXIS, VARY_AXIS)]) or "all"

    @property
    def seed(self) -> Any:
        return dict(self.settings).get("seed")

    def value(self, key: str) -> Any:
        return dict(self.settings).get(key)


@dataclass(frozen=True)
class Factor:
    """One factor of a ``vary:`` block: its named variants (label -> settings) and the rows it skips."""

    variants: dict[str, dict[str, Any]]
    not_for: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**({NOT_FOR: list(self.not_for)} if self.not_for else {}), **self.variants}


@dataclass
class StudySpec:
    """A parsed study spec (see the module docstring); ``source`` names the file for error messages."""

    source: str
    description: str = ""
    config: str = "default"
    overrides: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    axes: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # axis -> label -> settings
    vary: dict[str, Factor] = field(default_factory=dict)  # factor -> its variants (one at a time)
    report: dict[str, Any] = field(default_factory=lambda: dict(REPORT_DEFAULTS))
    explain: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return Path(self.source).stem

    def cells(self) -> list[Cell]:
        """Every cell, seed-major (all groups of the first seed first, so a partial study is comparable)."""
        axes = [a for a in self.axes if a != SEED_AXIS] + ([SEED_AXIS] if SEED_AXIS in self.axes else [])
        combos = itertools.product(*[list(self.axes[a].items()) for a in axes]) if axes else [()]
        cells = [c for combo in combos for c in self._row_cells(tuple(zip(axes, combo)))]
        names = [c.name for c in cells]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise WaferlabError(
                f"{self.source}: two cells would both be named {dup!r}; give the axis values distinct labels"
            )
        if SEED_AXIS in self.axes:
            order = {label: i for i, label in enumerate(self.axes[SEED_AXIS])}
            cells.sort(key=lambda c: order[dict(c.labels)[SEED_AXIS]])  # stable: group order kept
        return cells

    def _row_cells(self, combo: tuple[tuple[str, tuple[str, dict[str, Any]]], ...]) -> list[Cell]:
        """The cells of one combination of the axes: itself, or with ``vary:`` its base and variants."""
        if not self.vary:
            return [self._cell(combo)]
        seed = [c for c in combo if c[0] == SEED_AXIS]
        rest = tuple(c for c in combo if c[0] != SEED_AXIS)
        base = self._cell(rest + ((VARY_AXIS, (BASE_LABEL, {})),) + tuple(seed))
        cells = [base]
        labels = {label for _, (label, _) in rest}
        for factor, spec in self.vary.items():
            if labels & set(spec.not_for):
                continue
            for name, values in spec.variants.items():
                cell = self._cell(rest + ((VARY_AXIS, (f"{factor}-{name}", values)),) + tuple(seed),
                                  (factor, name), base.name)
                if (cell.config, dict(cell.settings)) != (base.config, dict(base.settings)):
                    cells.append(cell)  # a variant the row already has is its base cell: no second run
        return cells

    def _cell(self, combo: tuple[tuple[str, tuple[str, dict[str, Any]]], ...],
              variant: tuple[str, str] | None = None, base: str | None = None) -> Cell:
        settings = flatten(self.overrides)
        config = self.config
        for _axis, (_label, values) in combo:
            values = dict(values)
            config = values.pop("config", config)
            settings.update(flatten(values))
        labels = tuple((axis, label) for axis, (label, _) in combo)
        return Cell(cell_name(labels), labels, str(config), tuple(settings.items()), variant, base)

    def vary_pivot(self) -> dict[str, dict[tuple[str, str], tuple[str, bool] | None]]:
        """The ablation table of a ``vary:`` study: row -> (factor, variant) -> (group that ran it, whether
        that is the row's base cell), or None where the factor does not apply to the row (n/a)."""
        cells = self.cells()
        first = cells[0].seed if cells else None
        bases = {c.row: c.group for c in cells if c.seed == first and c.variant is None}
        ran = {(c.row, c.variant): c.group for c in cells if c.seed == first and c.variant}
        rows_labels = {c.row: {label for axis, label in c.labels} for c in cells if c.variant is None}
        pivot: dict[str, dict[tuple[str, str], tuple[str, bool] | None]] = {}
        for row, base in bases.items():
            pivot[row] = {}
            for factor, spec in self.vary.items():
                for name in spec.variants:
                    key = (factor, name)
                    if rows_labels[row] & set(spec.not_for):
                        pivot[row][key] = None
                    else:
                        group = ran.get((row, key))
                        pivot[row][key] = (group, False) if group else (base, True)
        return pivot

    def to_dict(self) -> dict[str, Any]:
        """Plain data (written as the study folder's ``study.yaml``)."""
        return {
            "description": self.description,
            "config": self.config,
            "set": self.overrides,
            "data": self.data,
            "axes": self.axes,
            **({"vary": {f: v.to_dict() for f, v in self.vary.items()}} if self.vary else {}),
            **({"report": self.report} if self.report != REPORT_DEFAULTS else {}),
            "explain": self.explain,
        }


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model_options": {"ratio": 2}}`` -> ``{"model_options.ratio": 2}`` (one nesting level, as --set)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix and value:
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def _label(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return _UNSAFE.sub("_", text).strip("_") or "x"


def cell_name(labels: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    """``[("model","cbam"), ("model_options.ratio","2"), ("seed","60")]`` -> ``cbam__ratio-2__seed-60``."""
    parts = [label if axis in (MODEL_AXIS, VARY_AXIS) else f"{axis.rsplit('.', 1)[-1]}-{label}"
             for axis, label in labels]
    return "__".join(parts)


def study_preset_names() -> list[str]:
    """Names of the study specs shipped in ``waferlab/configs/studies``."""
    return sorted(p.stem for p in STUDY_PRESET_DIR.glob("*.yaml"))


def resolve_spec_path(name_or_path: str) -> Path:
    """A preset name or a path to a YAML file -> the file's path (one-line error otherwise)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path or path.exists():
        if not path.is_file():
            raise WaferlabError(f"study spec not found: {name_or_path}")
        return path
    preset = STUDY_PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise WaferlabError(
            f"unknown study preset {name_or_path!r}; presets: "
            f"{', '.join(study_preset_names())} (or pass a path to a .yaml file)"
        )
    return preset


def load_spec(name_or_path: str, sets: list[str] | None = None) -> StudySpec:
    """Read and check a spec (preset name or YAML file) with ``--set`` items merged into its ``set:``;
    every cell's config is validated up front, and no ``vary:`` variant may repeat its base's run."""
    from waferlab.engine.config import load_yaml

    path = resolve_spec_path(name_or_path)
    raw = load_yaml(path)
    spec = parse_spec(raw if raw is not None else {}, str(path))
    merge_sets(spec, sets)
    if spec.config and ("/" in spec.config or spec.config.endswith((".yaml", ".yml"))):
        base = Path(spec.config)
        spec.config = str(base if base.is_absolute() else (path.parent / base).resolve())
    configs = {}
    for cell in spec.cells():
        try:
            configs[cell.name] = cell_config(cell)
        except WaferlabError as exc:
            raise WaferlabError(f"{path}: {exc}") from None
        if cell.base is not None and configs[cell.name] == configs[cell.base]:
            raise WaferlabError(
                f"{path}: cell {cell.name}: variant {cell.variant[1]!r} of factor {cell.variant[0]!r} is "
                f"its base's exact config (through {cell.config!r}); set it in the row or in 'set:' so the "
                "column shows the base cell instead of training the same run twice")
    return spec


def parse_spec(raw: Any, source: str) -> StudySpec:
    """Check the structure of a spec mapping (see the module docstring) and build a :class:`StudySpec`."""
    if not isinstance(raw, dict):
        raise WaferlabError(f"{source}: a study spec must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in SPEC_KEYS:
            raise WaferlabError(f"{source}: unknown key {key!r}; a spec has {', '.join(SPEC_KEYS)}")
    overrides = raw.get("set") or {}
    if not isinstance(overrides, dict):
        raise WaferlabError(f"{source}: field 'set': expected a mapping of config keys, got {overrides!r}")
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict):
        raise WaferlabError(f"{source}: field 'axes': expected a mapping axis -> values, got {axes_raw!r}")
    axes = {str(axis): _parse_axis(str(axis), values, source) for axis, values in axes_raw.items()}
    if VARY_AXIS in axes:
        raise WaferlabError(f"{source}: axis {VARY_AXIS!r} is reserved for the 'vary:' block's variants")
    data = raw.get("data")
    return StudySpec(
        source=source,
        description=str(raw.get("description") or "").strip(),
        config=str(raw.get("config") or "default"),
        overrides=dict(overrides),
        data=None if data in (None, "") else str(data),
        axes=axes,
        vary=_parse_vary(raw.get("vary"), axes, source),
        report=_parse_report(raw.get("report"), source),
        explain=_parse_explain(raw.get("explain"), source),
    )


def _parse_vary(raw: Any, axes: dict[str, dict[str, dict[str, Any]]], source: str) -> dict[str, Factor]:
    """The ``vary:`` block: factor -> {variant label -> settings, optional ``not_for: [row labels]``}."""
    if raw in (None, {}):
        return {}
    if not isinstance(raw, dict):
        raise WaferlabError(f"{source}: field 'vary': expected a mapping factor -> variants, got {raw!r}")
    known = {label for axis, values in axes.items() if axis != SEED_AXIS for label in values}
    out: dict[str, Factor] = {}
    for factor, values in raw.items():
        where = f"{source}: field 'vary.{factor}'"
        if not isinstance(values, dict) or not [k for k in values if k != NOT_FOR]:
            raise WaferlabError(f"{where}: expected a mapping of named variants (label -> settings), "
                                f"got {values!r}")
        not_for = values.get(NOT_FOR) or []
        if isinstance(not_for, str):
            not_for = [not_for]
        if not isinstance(not_for, list):
            raise WaferlabError(f"{source}: field 'vary.{factor}.{NOT_FOR}': expected a list of row labels, "
                                f"got {not_for!r}")
        unknown = [str(x) for x in not_for if _label(x) not in known]
        if unknown:
            raise WaferlabError(f"{source}: field 'vary.{factor}.{NOT_FOR}': {unknown[0]!r} is no label of "
                                f"the axes; labels: {', '.join(sorted(known)) or '(none)'}")
        variants = {}
        for label, settings in values.items():
            if label == NOT_FOR:
                continue
            settings = {} if settings is None else settings
            if not isinstance(settings, dict):
                raise WaferlabError(f"{where}, variant {label!r}: expected a mapping of settings, "
                                    f"got {settings!r}")
            if _label(label) in variants:
                raise WaferlabError(f"{where}: two variants give the label {_label(label)!r}")
            variants[_label(label)] = dict(settings)
        out[_label(factor)] = Factor(variants, tuple(_label(x) for x in not_for))
    return out


def _parse_report(raw: Any, source: str) -> dict[str, Any]:
    """The ``report:`` block (see :data:`REPORT_DEFAULTS`)."""
    if raw is None:
        return dict(REPORT_DEFAULTS)
    if not isinstance(raw, dict):
        raise WaferlabError(f"{source}: field 'report': expected a mapping, got {raw!r}")
    unknown = [k for k in raw if k not in REPORT_DEFAULTS]
    if unknown:
        raise WaferlabError(f"{source}: field 'report': unknown setting {unknown[0]!r}; settings: "
                            f"{', '.join(REPORT_DEFAULTS)}")
    out = {**REPORT_DEFAULTS, **raw}
    rule = out["min_defect_recall"]
    if rule is not None and (isinstance(rule, bool) or not isinstance(rule, int | float) or not 0 < rule < 1):
        raise WaferlabError(f"{source}: field 'report.min_defect_recall': expected a number in (0, 1), "
                            f"got {rule!r}")
    return out


def merge_sets(spec: StudySpec, sets: list[str] | None) -> None:
    """Merge ``--set key=value`` items into the spec's ``set:`` (a nested key merges into its mapping)."""
    from waferlab.engine.config import parse_set

    for key, value in parse_set(sets).items():
        old = spec.overrides.get(key)
        spec.overrides[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value


def select_cells(cells: list[Cell], patterns: list[str] | None) -> list[Cell]:
    """The cells whose name matches one of the shell-style ``patterns`` (``--only``; all when none)."""
    import fnmatch

    if not patterns:
        return cells
    globs = [g.strip() for p in patterns for g in p.split(",") if g.strip()]
    for glob in globs:
        if not any(fnmatch.fnmatchcase(c.name, glob) for c in cells):
            raise WaferlabError(f"--only {glob!r} matches no cell; cells are named like "
                                f"{', '.join(c.name for c in cells[:3])}")
    return [c for c in cells if any(fnmatch.fnmatchcase(c.name, g) for g in globs)]


def _parse_axis(axis: str, values: Any, source: str) -> dict[str, dict[str, Any]]:
    where = f"{source}: axis {axis!r}"
    if isinstance(values, list):
        if not values:
            raise WaferlabError(f"{where}: no values")
        if any(isinstance(v, (dict, list)) for v in values):
            raise WaferlabError(
                f"{where}: list values must be plain values; use a mapping label -> "
                "settings for variants that set several keys"
            )
        out = {_label(v): {axis: v} for v in values}
    elif isinstance(values, dict):
        if not values:
            raise WaferlabError(f"{where}: no variants")
        out = {}
        for label, settings in values.items():
            settings = {} if settings is None else settings
            if not isinstance(settings, dict):
                raise WaferlabError(
                    f"{where}, variant {label!r}: expected a mapping of settings, got {settings!r}"
                )
            if axis not in settings and _is_config_key(axis):
                settings = {axis: label, **settings}
            out[_label(label)] = dict(settings)
    else:
        raise WaferlabError(
            f"{where}: expected a list of values or a mapping label -> settings, got {values!r}"
        )
    if len(out) != len(values):
        raise WaferlabError(f"{where}: two values give the same label; use a mapping with distinct labels")
    if axis == SEED_AXIS and not all(isinstance(s.get("seed"), int) for s in out.values()):
        raise WaferlabError(f"{where}: seeds must be integers")
    return out


def _is_config_key(key: str) -> bool:
    from waferlab.engine.config import FIELD_NAMES

    return key.split(".", 1)[0] in FIELD_NAMES


def _parse_explain(raw: Any, source: str) -> dict[str, Any] | None:
    if raw in (None, False):
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise WaferlabError(f"{source}: field 'explain': expected a mapping or true, got {raw!r}")
    unknown = [k for k in raw if k not in EXPLAIN_DEFAULTS]
    if unknown:
        raise WaferlabError(
            f"{source}: field 'explain': unknown setting {unknown[0]!r}; settings: "
            f"{', '.join(EXPLAIN_DEFAULTS)}"
        )
    out = {**EXPLAIN_DEFAULTS, **raw}
    if isinstance(out["methods"], str):
        out["methods"] = [m.strip() for m in out["methods"].split(",") if m.strip()]
    from waferlab.explain.methods import METHODS

    bad = [m for m in out["methods"] if m not in METHODS]
    if bad:
        raise WaferlabError(
            f"{source}: field 'explain.methods': unknown method {bad[0]!r}; use {', '.join(METHODS)}"
        )
    for key in ("per_class", "score_per_class", "steps"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise WaferlabError(
                f"{source}: field 'explain.{key}': expected an integer >= 1, got {out[key]!r}"
            )
    out["road"] = bool(out["road"])
    return out


def yaml_value(value: Any) -> str:
    """A value as ``--set`` parses it back (YAML flow style, one line)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def train_arguments(cell: Cell, data: str | None, out: str | Path) -> list[str]:
    """The ``waferlab train`` arguments of a cell (without the program name and without --resume)."""
    args = ["train", "--config", cell.config]
    settings = dict(cell.settings)
    model = settings.pop("model", None) or cell_config(cell).model  # --model is required by train
    args[1:1] = ["--model", str(model)]
    args += ["--data", str(data or ""), "--out", str(out)]
    for key in TRAIN_FLAGS:
        if (
            key in settings
            and settings[key] is not None
            and not isinstance(settings[key], (dict, list, bool))
        ):
            args += [f"--{key.replace('_', '-')}", str(settings.pop(key))]
    for key, value in settings.items():
        args += ["--set", f"{key}={yaml_value(value)}"]
    return args + ["--no-progress"]


def cell_config(cell: Cell, data: str | None = None) -> Any:
    """The cell's resolved, validated :class:`TrainConfig` (a bad key or value is a one-line error)."""
    from waferlab.engine.config import build_config

    sets = [f"{k}={yaml_value(v)}" for k, v in cell.settings]
    try:
        return build_config(cell.config, {"data": data} if data else None, sets)
    except WaferlabError as exc:
        raise WaferlabError(f"cell {cell.name}: {exc}") from None
