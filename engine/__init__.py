"""The request's life outside the model: offline LLM, EngineCore, processing and outputs."""

from caldera.engine.outputs import CompletionOutput, RequestOutput
from caldera.engine.sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch and the model code: import it only when asked for.
    if name == "LLM":
        from caldera.engine.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
