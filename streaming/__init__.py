"""Serving worldloop: the engine that steps every session's model, and the websocket server around it.

Transport-free core: ``engine`` (generation thread, pacing, batching, speculation), ``session`` (a session's
handle and frames), ``protocol`` (messages v1, validation, frame header), ``encoding``, ``recording``,
``metrics``. Transport: ``server`` (HTTP routes, ``/ws``), ``connection`` (one socket), ``outbox`` (flow
control), ``registry`` (resumable sessions), ``http`` (access policy, static files). ``client`` is the
Python client. The protocol is documented in docs/protocol.md.
"""
