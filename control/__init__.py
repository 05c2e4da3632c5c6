"""Operator control plane: an HTTP API with roles and a live status page (`rta control serve`).

FastAPI + uvicorn over what the CLI already uses (stream.operators' audit path, the Redis
window store, model.registry); no torch, no training/, no ray. Layout:

    auth.py      tokens (stored hashed), roles, browser sessions, Origin check, write rate limit
    service.py   the operations (targets with expected_version, fleet, series sampler, models, reports)
    app.py       thin HTTP routes over the two above
    cli.py       `rta control serve|token`
    static/      the status page (vendored uPlot, no CDN)
"""
