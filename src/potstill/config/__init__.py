"""Typed configs for every stage: YAML file + `key=value` overrides + CLI options, validated with one-line errors.

One class per command that does work: `DistillConfig` (`potstill distill`), `CacheConfig` (`cache build`),
`StudentInitConfig` (`student init`), `EvalConfig` (`eval`), `GenerateConfig` (`generate`). Their field
descriptions are the reference: docs/config-reference.md and configs/kd_default.yaml are generated from
them (`python -m potstill.config`). `load_config(path, overrides, model)` reads the YAML, applies dotted
overrides such as `loss.alpha=0.9` or `train.max_steps=50`, and validates. Unknown keys and bad values
raise `UserError` naming the key and what is allowed, e.g. `config: loss.beta: must be <= 1 (got 1.5)`.

Modules: `base` (the `Section` base, overrides, error messages), `distill`, `generate`, `stages` (cache,
student init, eval), `load` (reading a config), `reference` (the generated docs).
"""

from potstill.config.base import (
    CacheEncoding,
    CacheTargets,
    Dtype,
    LayerSelection,
    LossName,
    Section,
    apply_overrides,
    dump_config,
    flag,
    read_yaml,
)
from potstill.config.distill import (
    LOSS_NAMES,
    DataConfig,
    DistillConfig,
    HiddenConfig,
    LossConfig,
    MixingConfig,
    ModelConfig,
    OnPolicyConfig,
    TeacherConfig,
    TeacherEndpointConfig,
    TeacherEntry,
    TrainConfig,
)
from potstill.config.generate import GenerateConfig, SamplingConfig, TeacherSourceConfig
from potstill.config.load import is_distill_config, load_cache_config, load_config, validate_config
from potstill.config.reference import default_yaml, reference_markdown
from potstill.config.stages import CacheConfig, EvalConfig, StudentInitConfig

__all__ = [
    "CacheEncoding",
    "CacheTargets",
    "LayerSelection",
    "LossName",
    "LOSS_NAMES",
    "CacheConfig",
    "DataConfig",
    "DistillConfig",
    "Dtype",
    "EvalConfig",
    "GenerateConfig",
    "HiddenConfig",
    "LossConfig",
    "MixingConfig",
    "ModelConfig",
    "OnPolicyConfig",
    "SamplingConfig",
    "Section",
    "StudentInitConfig",
    "TeacherConfig",
    "TeacherEndpointConfig",
    "TeacherEntry",
    "TeacherSourceConfig",
    "TrainConfig",
    "apply_overrides",
    "default_yaml",
    "dump_config",
    "flag",
    "is_distill_config",
    "load_cache_config",
    "load_config",
    "read_yaml",
    "reference_markdown",
    "validate_config",
]
