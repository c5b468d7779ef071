"""Recovery from runs whose process died (the GPU worker's whole tree killed, a machine lost): Prefect
cannot see such a run end, so it would stay Running for good. `scoft recovery` installs two
automations on the server that PREFECT_API_URL names (installing again replaces them):

- `scoft: crash silent runs`: a retrain or retrain-culture run that sent a heartbeat and then none
  for HEARTBEAT_TIMEOUT_S becomes Crashed (the gpu job templates send one every 30 s);
- `scoft: retry crashed runs`: a crashed retrain or retrain-culture run is scheduled again, so the
  next free worker reruns it in the same workspace: DVC skips the stages that finished, training
  resumes from its last checkpoint, and the workspace's DVC slot is free as soon as the dead
  run's processes are gone (tasks.dvc.workspace_slot). A run that keeps crashing stops after
  orchestration.max_attempts starts (flows.retrain).
"""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture

from flows.alerts import replace_automations

CRASH_SILENT, RETRY_CRASHED = "scoft: crash silent runs", "scoft: retry crashed runs"
RECOVERED_FLOWS = ["retrain", "retrain-culture"]
# Three missed heartbeats of 30 s: a busy but live run is never crashed by a late one.
HEARTBEAT_TIMEOUT_S = 90
_TERMINAL = ["prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
             "prefect.flow-run.Crashed"]


def _automations(heartbeat_timeout_s: float) -> list[Automation]:
    runs = {"prefect.resource.id": "prefect.flow-run.*"}
    flows = {"prefect.resource.role": "flow", "prefect.resource.name": RECOVERED_FLOWS}
    silent = EventTrigger(after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *_TERMINAL},
                          match=runs, match_related=flows, for_each={"prefect.resource.id"},
                          posture=Posture.Proactive, threshold=1, within=timedelta(seconds=heartbeat_timeout_s))
    crashed = EventTrigger(expect={"prefect.flow-run.Crashed"}, match=runs, match_related=flows,
                           posture=Posture.Reactive, threshold=1, within=0)
    return [
        Automation(name=CRASH_SILENT, description="A retrain run's process stopped sending heartbeats",
                   trigger=silent, actions=[ChangeFlowRunState(
                       state=StateType.CRASHED,
                       message=f"no heartbeat for {heartbeat_timeout_s:g} s: the flow run's process is gone")]),
        Automation(name=RETRY_CRASHED, description="Run a crashed retrain run again: it resumes where it stopped",
                   trigger=crashed, actions=[ChangeFlowRunState(
                       state=StateType.SCHEDULED, name="AwaitingRetry",
                       message="retried after a crash: finished stages are skipped, training resumes")]),
    ]


def install_recovery(heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> list[Automation]:
    return replace_automations(_automations(heartbeat_timeout_s))
