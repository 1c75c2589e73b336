"""Power flow: OpenDSS engine contexts, snapshot and QSTS studies, linearised sensitivities."""
