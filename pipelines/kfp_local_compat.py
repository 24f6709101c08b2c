"""kfp.local (2.17) runs `dsl.OneOf` over parameters but not over artifacts; this lets it, locally.

The training pipeline's cleaned photos are `dsl.OneOf(clean-photos, clean-merge-shards)` (one task, or
shards and a merge, chosen by `clean_shards`). A KFP backend resolves that to the branch that ran;
kfp.local's `get_dag_output_artifacts` refuses any selector list longer than one ("Expected 1 artifact
in ArtifactSelectorSpec. Got: 2"), although its parameter twin already picks the branch that produced
a value. `allow_oneof_artifacts` makes the artifact path do the same: a DAG output with several
selectors takes the one producer that has the output, and is an error if none or several have it.
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_shopvision_oneof_artifacts"


def allow_oneof_artifacts() -> None:
    """Patch kfp.local once per process (idempotent); single-selector outputs behave exactly as before."""
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    if getattr(OrchestratorUtils, _PATCHED, False):
        return
    original = OrchestratorUtils.get_dag_output_artifacts.__func__

    def get_dag_output_artifacts(cls, dag_outputs_spec, io_store) -> dict[str, Any]:
        single = [
            key for key, spec in dag_outputs_spec.artifacts.items() if len(spec.artifact_selectors) == 1
        ]
        outputs = original(cls, _only(dag_outputs_spec, single), io_store) if single else {}
        for key, spec in dag_outputs_spec.artifacts.items():
            if key in outputs:
                continue
            found = []
            for selector in spec.artifact_selectors:
                try:
                    found.append(
                        io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key)
                    )
                except (KeyError, ValueError):  # that branch did not run
                    continue
            if len(found) != 1:
                raise ValueError(f"dsl.OneOf output {key!r}: {len(found)} branches produced it, expected one")
            outputs[key] = found[0]
        return outputs

    OrchestratorUtils.get_dag_output_artifacts = classmethod(get_dag_output_artifacts)
    setattr(OrchestratorUtils, _PATCHED, True)


def _only(dag_outputs_spec, keys: list[str]):
    """A copy of the outputs spec holding only `keys`' artifacts (the ones kfp itself can resolve)."""
    subset = type(dag_outputs_spec)()
    subset.CopyFrom(dag_outputs_spec)
    for key in list(subset.artifacts):
        if key not in keys:
            del subset.artifacts[key]
    return subset
