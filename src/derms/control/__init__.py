"""Real-time control (layer 8): the arbiter of requests from safety, the ADMS, operators
and the optimiser (:mod:`~derms.control.requests`, :mod:`~derms.control.arbiter`), their
persistence and audit (:mod:`~derms.control.persistence`) and the ADMS interface
(:mod:`~derms.control.adms`, :mod:`~derms.control.adms_mqtt`)."""
