"""The pipeline config: its schema (``schema``), how a text becomes settings or a
list of problems (``loading``, ``problems``), and the process-wide config."""

from pipeline.config.loading import Checked, check_text, config_at, config_version, get_config, load_config, parse_config, set_config
from pipeline.config.problems import Problem
from pipeline.config.schema import (
    AssembleConfig,
    BatchConfig,
    BreakerConfig,
    DedupConfig,
    LimitsConfig,
    LoggingConfig,
    PipelineInfo,
    PipelineSettings,
    PostprocessConfig,
    QueuesConfig,
    RagConfig,
    RateLimitConfig,
    RedactionPattern,
    RetryConfig,
    TokenBusConfig,
    WorkerConfig,
    WorkerKind,
)

__all__ = [
    "AssembleConfig",
    "BatchConfig",
    "BreakerConfig",
    "Checked",
    "DedupConfig",
    "LimitsConfig",
    "LoggingConfig",
    "PipelineInfo",
    "PipelineSettings",
    "PostprocessConfig",
    "Problem",
    "QueuesConfig",
    "RagConfig",
    "RateLimitConfig",
    "RedactionPattern",
    "RetryConfig",
    "TokenBusConfig",
    "WorkerConfig",
    "WorkerKind",
    "check_text",
    "config_at",
    "config_version",
    "get_config",
    "load_config",
    "parse_config",
    "set_config",
]
