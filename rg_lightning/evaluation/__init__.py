"""Safety and utility evaluation: benchmarks, utility tasks, judges, metrics, the suite and its report.

``lightning test --config <run config>`` runs it through :class:`rg_lightning.callbacks.SafetyEvaluation`;
:class:`EvaluationSuite` runs it on any Hugging Face causal LM without Lightning.
"""

from rg_lightning.evaluation.benchmarks import Benchmark, benchmark_names, load_benchmark
from rg_lightning.evaluation.judges import (
    HarmBenchJudge,
    Judge,
    KeywordJudge,
    LlamaGuardJudge,
    LogitRefusalJudge,
    make_judge,
)
from rg_lightning.evaluation.metrics import (
    AnswerAccuracy,
    AttackSuccessRate,
    OverRefusalRate,
    RateMetric,
    RefusalRate,
)
from rg_lightning.evaluation.report import write_report
from rg_lightning.evaluation.suite import EvaluationSuite, Row
from rg_lightning.evaluation.tasks import UtilityTask, load_task, task_names

__all__ = [
    "AnswerAccuracy", "AttackSuccessRate", "Benchmark", "EvaluationSuite", "HarmBenchJudge", "Judge", "KeywordJudge",
    "LlamaGuardJudge", "LogitRefusalJudge", "OverRefusalRate", "RateMetric", "RefusalRate", "Row",
    "UtilityTask", "benchmark_names", "load_benchmark", "load_task", "make_judge", "task_names", "write_report",
]
