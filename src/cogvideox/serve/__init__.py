"""CogVideoX as a service: an HTTP API in the shape of OpenAI's video endpoints, a durable job queue in
SQLite or PostgreSQL, workers that run the `Pipeline`, and a web page.

    app.py     the API and the page (FastAPI), over ...
    jobs.py    ... the queue: one table, the same SQL on SQLite and PostgreSQL
    worker.py  claims jobs, calls the Pipeline, writes the MP4s
    spec.py    what the served model can make, from its configs (requests are checked before queueing)
    schemas.py request and response bodies;  body.py, errors.py, limits.py, metrics.py: the rest
    cli.py     `cogvideox serve` and `cogvideox worker`

Needs the `serve` extra: `pip install "cogvideox[serve]"`.
"""
