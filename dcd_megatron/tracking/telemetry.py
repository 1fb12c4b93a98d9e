"""MLflow's usage telemetry is off in every process of ours unless the user turns it on.

MLflow 3 sends usage events to its telemetry host and writes ``~/.config/mlflow/telemetry.json``
as soon as ``mlflow`` is imported, unless ``MLFLOW_DISABLE_TELEMETRY`` or ``DO_NOT_TRACK`` says
no. Training jobs on clusters must not phone home, so ``telemetry_off()`` runs before any import
of mlflow; a user who set either variable (``MLFLOW_DISABLE_TELEMETRY=false`` turns it on) is obeyed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

SWITCH = "MLFLOW_DISABLE_TELEMETRY"
USER_SWITCHES = (SWITCH, "DO_NOT_TRACK")


def telemetry_off(env: MutableMapping[str, str] | None = None) -> bool:
    """Set ``MLFLOW_DISABLE_TELEMETRY=true`` unless the user set it or ``DO_NOT_TRACK``; True if set here.

    Call it before ``import mlflow`` (MLflow decides at import time); if mlflow is already imported,
    its telemetry client is dropped so no further events are recorded. Harmless to call again.
    """
    env = os.environ if env is None else env
    if any(name in env for name in USER_SWITCHES):
        return False
    env[SWITCH] = "true"
    if env is os.environ and "mlflow.telemetry" in sys.modules:
        try:
            sys.modules["mlflow.telemetry"].set_telemetry_client()  # re-reads the switch: None now
        except Exception:  # pragma: no cover - an mlflow without this hook
            pass
    return True
