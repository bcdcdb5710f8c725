"""Fine-tuning as a service: OpenAI's files, jobs, events, checkpoints and models routes, with keys and projects.

    store.py        the tables (SQLAlchemy): the jobs table is the queue
    migrate.py      Alembic migrations (migrations/), run when a store opens
    keys.py         projects and bearer keys (stored hashed): `tunelab keys create|list|revoke`
    files.py        uploads streamed to disk, validated by tunelab's validator
    jobs.py         a create request -> a RunConfig, OpenAI's job / event / checkpoint objects
    supervisor.py   claims queued jobs, starts a worker per job, resumes after a crash
    worker.py       one job in a child process: training, heartbeats, events, checkpoints, result files
    routes.py       the HTTP routes, mounted on the serving app (serve/app.py)
"""
