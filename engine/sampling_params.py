"""SamplingParams, as users import it (``caldera.engine.SamplingParams``). The class lives with
the step data in ``caldera.scheduler.output``, which workers read without importing the engine."""

from caldera.scheduler.output import SamplingParams

__all__ = ["SamplingParams"]
