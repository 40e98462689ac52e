"""The sample backend: a small stand-in for the aiPBX NestJS backend with the same contract
(HTTP under /api on $PORT, WebSocket on 3033, UDP echo keyed by source on $UDP_SERVER_PORT,
one row per write through PgBouncer) and its version in every answer, so tests and the demo
can tell which color served them. Run it with gunicorn and aipbx_sample/gunicorn_conf.py."""
